"""TLS for client connections, sans-IO: ``ssl.SSLObject`` over two ``MemoryBIO``s.

The worker's loop owns the raw non-blocking socket; OpenSSL never touches it
(as in asyncio's ``sslproto``). Bytes read from the socket go into the
incoming BIO, OpenSSL's records come out of the outgoing one, and this module
moves them with plain ``recv`` and ``send`` calls, so nothing here can block a
loop.

A TLS connection lives in two stages:

* :class:`Handshake`, from the hand-off until the handshake is done. It is
  registered on the worker's selector with itself as the callback, waits for
  readability or writability as the handshake needs, and is dropped when it
  fails or takes longer than ``--tls-handshake-timeout``. The worker never
  sees it as a client: no ``ERR`` line can be sent without a session.
* :class:`TlsStream`, once established: it stands in for the socket in the
  worker's ``Client`` (``recv``, ``send``, ``sendmsg``, ``fileno``,
  ``close``), so that the worker's read and write paths, its limits and its
  one write per socket per turn are the same code for TLS and plaintext.

The write path keeps that promise: what the worker hands over in one call
(the turn's lines for that socket, joined) is encrypted with one
``SSLObject.write`` and sent with one ``send``. A record the kernel takes
only in part cannot be cut back to lines, so its ciphertext waits here, and
the plaintext it *covers* stays at the head of the worker's output list (and
counts against ``--max-pending``) until the last byte is in the kernel. To
the worker a TLS socket is one that takes nothing until the records in flight
are out.
"""

import hashlib
import logging
import selectors
import socket
import ssl

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE
HANDSHAKE_READ = 65536     # a ClientHello, or the client's last flight and its first lines
CUT_WHOLE = 65536          # a cut connection's unsent output is still tried up to this size


class NoPassphrase(Exception):
    """An encrypted private key: the server cannot ask anybody for its passphrase."""


def _no_passphrase():
    raise NoPassphrase()


def server_context(certfile, keyfile=None):
    """The server's context, with the ``ssl`` module's server defaults.

    ``create_default_context(Purpose.CLIENT_AUTH)``, TLS 1.2 at least (3.9's
    default still allows 1.0), no compression (the default), and no
    renegotiation, which a client could otherwise ask for again and again,
    each costing the server a handshake's worth of work.
    """
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    ctx.load_cert_chain(certfile, keyfile, password=_no_passphrase)
    return ctx


# OpenSSL's words for a key that is not the certificate's. A key of another
# type (RSA for an EC certificate) goes to a slot of its own, beside the
# certificate's, and that slot has no certificate: NO_CERTIFICATE_ASSIGNED
# (the certificate itself did load: load_problem has checked it is there).
KEY_MISMATCH = {"KEY_VALUES_MISMATCH", "NO_CERTIFICATE_ASSIGNED"}


def load_problem(certfile, keyfile=None):
    """``(context, None)``, or ``(None, one line saying what is wrong)``."""
    texts = {}
    for option, path in (("--tls-cert", certfile), ("--tls-key", keyfile)):
        if path is not None:
            try:
                with open(path, "rb") as f:
                    texts[option] = f.read()
            except OSError as exc:
                return None, "%s %s: %s" % (option, path, exc.strerror or exc)
    key_option, key_path = ("--tls-key", keyfile) if keyfile else ("--tls-cert", certfile)
    if b"-----BEGIN CERTIFICATE-----" not in texts["--tls-cert"]:
        return None, "--tls-cert %s: no PEM certificate in it" % certfile
    if b"PRIVATE KEY-----" not in texts[key_option]:
        return None, "%s %s: no PEM private key in it%s" % (
            key_option, key_path, "" if keyfile else " (give it with --tls-key)")
    try:
        return server_context(certfile, keyfile), None
    except NoPassphrase:
        return None, "%s %s: the private key is encrypted; give it without a passphrase" % (
            key_option, key_path)
    except ssl.SSLError as exc:
        if exc.reason in KEY_MISMATCH:
            return None, "%s %s: the private key does not match the certificate in %s" % (
                key_option, key_path, certfile)
        return None, "cannot load the certificate %s and its key: %s" % (
            certfile, exc.reason or exc)
    except (OSError, ValueError) as exc:
        return None, "cannot load the certificate %s and its key: %s" % (certfile, exc)


def fingerprint(certfile):
    """SHA-256 of the first certificate in ``certfile`` (the server's own),
    shortened, for the log: which certificate is being served."""
    try:
        with open(certfile) as f:
            pem = f.read()
        start = pem.index("-----BEGIN CERTIFICATE-----")
        end = pem.index("-----END CERTIFICATE-----", start) + len("-----END CERTIFICATE-----")
        digest = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem[start:end])).hexdigest()
    except (OSError, ValueError):
        return "?"
    return ":".join(digest[i:i + 2] for i in range(0, 16, 2)).upper() + "..."


class TlsServer:
    """One worker's TLS side: its context, its handshakes, their figures.

    ``on_ready(handshake, stream)`` gets an established connection (whose
    first ``recv`` returns what came with the handshake, if anything);
    ``on_failed(handshake)`` a connection gone without a session, closed.
    """

    def __init__(self, config, sel, on_ready, on_failed, log=None):
        self.certfile = config.tls_cert
        self.keyfile = config.tls_key
        self.timeout = config.tls_handshake_timeout
        self.sel = sel
        self.on_ready = on_ready
        self.on_failed = on_failed
        self.log = log or logging.getLogger("tls")
        self.pending = {}          # Handshake -> None, oldest first (deadline order)
        self.completed = 0         # handshakes done
        self.failed = 0            # handshakes failed, timed out, or abandoned
        self.context = None
        self.reload()

    def reload(self):
        """Load the certificate and key again; keep the old ones if that fails."""
        context, problem = load_problem(self.certfile, self.keyfile)
        if context is None:
            self.log.error("TLS certificate not loaded (%s)%s", problem,
                           "; keeping the previous one" if self.context else
                           "; TLS connections are refused")
            return False
        self.context = context
        return True

    def figures(self):
        return {"tls_handshakes": self.completed, "tls_failed": self.failed,
                "tls_pending": len(self.pending)}

    # -- the handshake --------------------------------------------------------

    def accept(self, sock, ip, now):
        """Start the handshake of a connection on the TLS port (non-blocking)."""
        if self.context is None:
            self.failed += 1
            sock.close()
            self.on_failed(Handshake(self, sock, ip, now, None))
            return
        hs = Handshake(self, sock, ip, now, self.context)
        self.pending[hs] = None
        hs.interest = READ
        self.sel.register(sock, READ, hs)
        hs(READ)       # the ClientHello is usually here already

    def step(self, hs):
        """Go on with ``hs`` as far as the bytes at hand allow."""
        if hs.backlog and not hs.push():
            return hs.want(WRITE)
        try:
            data = hs.sock.recv(HANDSHAKE_READ)
        except (BlockingIOError, InterruptedError):
            return hs.want(READ)
        except OSError as exc:
            return self.fail(hs, "connection error: %s" % (exc.strerror or exc))
        if not data:
            return self.fail(hs, "closed during the TLS handshake")
        if hs.first is None:
            hs.first = data[:1]
        hs.incoming.write(data)
        try:
            hs.obj.do_handshake()
        except ssl.SSLWantReadError:
            hs.backlog += hs.outgoing.read()
            return hs.want(READ if hs.push() else WRITE)
        except ssl.SSLError as exc:
            if hs.first == b"\x16":   # it speaks TLS: tell it why, in an alert
                hs.backlog += hs.outgoing.read()
                hs.push()
            return self.fail(hs, "TLS handshake failed: %s" % (exc.reason or exc))
        self.established(hs)

    def established(self, hs):
        del self.pending[hs]
        self.completed += 1
        self.sel.unregister(hs.sock)
        stream = TlsStream(hs.sock, hs.obj, hs.incoming, hs.outgoing)
        stream.backlog = hs.backlog + hs.outgoing.read()   # TLS 1.3 session tickets
        if stream.backlog:
            stream.push()    # what the kernel does not take goes with the first answer
        try:
            stream.ready = stream.decrypt()
        except BlockingIOError:
            pass
        except OSError as exc:
            self.completed -= 1
            self.failed += 1
            self.log.debug("TLS connection from %s failed at once: %s", hs.ip, exc)
            stream.close()
            self.on_failed(hs)
            return
        self.on_ready(hs, stream)

    def fail(self, hs, reason):
        self.pending.pop(hs, None)
        self.failed += 1
        self.log.debug("TLS connection from %s dropped: %s", hs.ip, reason)
        if hs.interest:
            self.sel.unregister(hs.sock)
            hs.interest = 0
        hs.sock.close()
        self.on_failed(hs)

    def sweep(self, now):
        """Drop the handshakes older than the timeout (a trickle is cut too)."""
        deadline = now - self.timeout
        for hs in list(self.pending):
            if hs.since > deadline:
                break
            self.fail(hs, "TLS handshake timeout")

    def close_all(self):
        """Shutdown: handshakes in progress just close (no session, no ERR line)."""
        for hs in list(self.pending):
            self.pending.pop(hs)
            if hs.interest:
                self.sel.unregister(hs.sock)
                hs.interest = 0
            hs.sock.close()
            self.on_failed(hs)


class Handshake:
    """A connection on the TLS port whose handshake is not done yet."""

    __slots__ = ("server", "sock", "ip", "since", "obj", "incoming", "outgoing",
                 "backlog", "interest", "first")

    def __init__(self, server, sock, ip, now, context):
        self.server = server
        self.sock = sock
        self.ip = ip
        self.since = now           # the hand-off: timeouts count from here
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = (context.wrap_bio(self.incoming, self.outgoing, server_side=True)
                    if context is not None else None)
        self.backlog = b""         # handshake records the kernel has not taken yet
        self.interest = 0
        self.first = None          # the first byte received: 0x16 if it speaks TLS

    def __call__(self, mask):
        self.server.step(self)

    def want(self, events):
        if events != self.interest:
            self.server.sel.modify(self.sock, events, self)
            self.interest = events

    def push(self):
        """Send what we can of the backlog; True once it is all out."""
        try:
            self.backlog = send_some(self.sock, self.backlog)
        except OSError:
            self.backlog = b""         # the next recv says what happened
        return not self.backlog


class TlsStream:
    """An established TLS connection, shaped like the socket the worker expects."""

    __slots__ = ("sock", "obj", "incoming", "outgoing", "backlog", "covered", "eof", "ready")

    def __init__(self, sock, obj, incoming, outgoing):
        self.sock = sock
        self.obj = obj
        self.incoming = incoming
        self.outgoing = outgoing
        self.backlog = b""         # ciphertext the kernel has not taken yet...
        self.covered = 0           # ...and how many plaintext bytes of the worker's it holds
        self.eof = False           # the client sent close_notify
        self.ready = b""           # plaintext that came with the handshake

    def fileno(self):
        return self.sock.fileno()

    # -- reading --------------------------------------------------------------

    def recv(self, size):
        """The plaintext of the records that are complete; ``b""`` at the end.

        BlockingIOError when nothing whole has come (a record cut by TCP, or
        only TLS messages that carry no data); an ``ssl.SSLError`` (an
        OSError) for a broken stream.
        """
        if self.ready:
            data, self.ready = self.ready, b""
            return data
        if self.eof:
            return b""
        data = self.sock.recv(size)
        if not data:
            return b""     # no close_notify: a truncation, or a TCP half-close
        self.incoming.write(data)
        return self.decrypt()

    def decrypt(self):
        chunks = []
        try:
            while True:
                chunk = self.obj.read(HANDSHAKE_READ)
                if not chunk:          # close_notify (older versions raise instead)
                    raise ssl.SSLZeroReturnError()
                chunks.append(chunk)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            # close_notify: like a TCP half-close. Make the socket readable
            # again, so that the end is seen after the data that came with it.
            self.eof = True
            try:
                self.sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass
        if self.outgoing.pending:      # a KeyUpdate, an alert: goes with the next write
            self.backlog += self.outgoing.read()
        data = b"".join(chunks)
        if not data and not self.eof:
            raise BlockingIOError()
        return data

    # -- writing --------------------------------------------------------------

    def send(self, data):
        return self.sendmsg((data,))

    def sendmsg(self, buffers):
        """Encrypt and send ``buffers`` (the socket's output for this turn).

        Returns how many of their bytes the worker may forget: all of them,
        or only those whose records were already in flight, or none while
        records are still waiting. One ``write`` (encryption) and one
        ``send`` per call, the first one or two skipped while waiting.
        """
        done = 0
        if self.backlog:
            if not self.push():
                return 0
            done, self.covered = self.covered, 0
        data = buffers[0] if len(buffers) == 1 else b"".join(buffers)
        if done:
            data = data[done:]
        if data:
            self.encrypt(data)
            if not self.push():
                self.covered = len(data)
                return done
            done += len(data)
        return done

    def encrypt(self, data):
        """One ``SSLObject.write`` (it cuts the records itself)."""
        view = memoryview(data)
        written = self.obj.write(view)
        while written < len(data):     # never seen with a memory BIO; to be safe
            written += self.obj.write(view[written:])
        self.backlog += self.outgoing.read()

    def push(self):
        """Send what we can of the backlog; True once it is all out (OSError:
        the connection is broken)."""
        self.backlog = send_some(self.sock, self.backlog)
        return not self.backlog

    def cut(self, data, line):
        """The connection is cut: ``data`` is everything it is owed, ending
        with its last ``line``. True when all of it is out at once; else the
        records in flight and ``line`` are what is left to drain (the worker's
        output becomes ``[line]``), and the rest is forgotten."""
        try:
            if self.backlog and not self.push():
                self.covered = 0
                self.encrypt(line)
                self.covered = len(line)
                return False
            data = data[self.covered:]
            self.covered = 0
            self.encrypt(data if len(data) <= CUT_WHOLE else line)
            if self.push():
                return True
            self.covered = len(line)
            return False
        except (OSError, ValueError):
            return True        # nothing more can go out: close at once

    def close(self):
        """Say close_notify if nothing is waiting (never blocking), then close."""
        if not self.backlog:
            try:
                self.obj.unwrap()
            except (ssl.SSLError, ValueError):
                pass
            try:
                self.sock.send(self.outgoing.read(), socket.MSG_DONTWAIT)
            except OSError:
                pass
        self.sock.close()


def send_some(sock, data):
    """Send what the kernel takes of ``data`` now; what is left of it.
    OSError: the connection is broken."""
    try:
        return data[sock.send(data):]
    except (BlockingIOError, InterruptedError):
        return data

