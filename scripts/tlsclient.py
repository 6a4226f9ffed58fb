"""A sans-IO TLS client, for the load tool (stress.py) and the TLS tests.

:class:`TlsClient` is ``ssl.SSLObject`` over two ``MemoryBIO``s: the tool
keeps its own non-blocking socket and selectors loop, gives this object the
ciphertext it read, and sends the ciphertext it gets back. Nothing here
touches a socket, so nothing here can block a loop.

* Plaintext written before the handshake is done waits here, and goes out
  encrypted with the client's last handshake flight.
* Every :meth:`TlsClient.decrypt` reads OpenSSL dry: epoll cannot see
  plaintext OpenSSL holds, so whatever a read brings is returned at once.
* The server's close_notify sets :attr:`TlsClient.closed` (the end of the
  stream, after the plaintext that came with it).
* :meth:`TlsClient.close_write` is a half-close: the client's close_notify,
  after which it still reads.

The tools run against throw-away self-signed certificates:
:func:`client_context` checks none, or the chain against the ones it is
given.
"""

import ssl

READ_SIZE = 1 << 18         # plaintext asked of OpenSSL per read (it gives a record at most)


def client_context(trusted=()):
    """A client context that accepts any certificate; given ``trusted``
    (certificate files), one that accepts a chain of one of them. Names are
    not checked (a self-signed CN=localhost is the server of any address)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    if not trusted:
        ctx.verify_mode = ssl.CERT_NONE
    for path in trusted:
        ctx.load_verify_locations(path)
    return ctx


class TlsClient:
    """One client connection's TLS, without its socket."""

    __slots__ = ("incoming", "outgoing", "obj", "established", "closed", "pending")

    def __init__(self, context, server_hostname="localhost"):
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing,
                                    server_hostname=server_hostname)
        self.established = False
        self.closed = False         # the server's close_notify came
        self.pending = []           # plaintext written before the handshake was done

    def start(self):
        """The ClientHello: the ciphertext to send first."""
        return self.handshake()

    def handshake(self):
        """Take the handshake as far as it goes; the ciphertext to send (with
        the plaintext that waited, encrypted, once it is done)."""
        try:
            self.obj.do_handshake()
        except ssl.SSLWantReadError:
            return self.outgoing.read()
        self.established = True
        if self.pending:
            data, self.pending = b"".join(self.pending), []
            self.obj.write(data)
        return self.outgoing.read()

    def encrypt(self, data):
        """The ciphertext of ``data`` (b"" until the handshake is done: it waits)."""
        if not self.established:
            self.pending.append(data)
            return b""
        self.obj.write(data)
        return self.outgoing.read()

    def decrypt(self, data):
        """Feed ``data`` read from the socket: ``(plaintext, ciphertext to
        send)``, either possibly b"". Sets :attr:`closed` at close_notify;
        a broken stream raises ``ssl.SSLError``."""
        self.incoming.write(data)
        reply = b""
        if not self.established:
            reply = self.handshake()
            if not self.established:
                return b"", reply
        chunks = []
        read = self.obj.read
        try:
            while True:
                chunk = read(READ_SIZE)
                if not chunk:
                    self.closed = True
                    break
                chunks.append(chunk)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:      # close_notify, in older versions
            self.closed = True
        if self.outgoing.pending:           # a KeyUpdate, an alert
            reply += self.outgoing.read()
        return b"".join(chunks), reply

    def close_write(self):
        """The client's close_notify (what it wrote before goes first): the
        ciphertext to send. The server's answers can still be read. Before
        the handshake is done there is no session to close: b"" (a TCP
        half-close is all there is)."""
        if not self.established:
            return b""
        try:
            self.obj.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
            pass                # the server's close_notify has not come yet
        return self.outgoing.read()
