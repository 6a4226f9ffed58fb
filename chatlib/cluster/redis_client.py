"""One connection to Redis for a ``selectors`` loop: non-blocking, pipelined,
reconnecting.

The owner's loop drives it: the client registers its socket with a callable
as the key's ``data`` (the loop calls ``key.data(mask)``), and the owner
calls :meth:`RedisClient.flush` and :meth:`RedisClient.tick` every turn and
sleeps no longer than :meth:`RedisClient.next_wakeup`. Commands queued in a
turn go out together, in one ``send`` as far as the kernel takes them.
Nothing blocks but ``getaddrinfo``, once an attempt to connect: instant for
an IP address or a name in ``/etc/hosts``, a DNS lookup otherwise.

A lost connection answers every command still unanswered with a
:class:`ConnectionLost` and is never resumed: what was sent may or may not
have run, and only the owner knows what to do again, in ``on_up``, once a
fresh connection is ready.
"""

import errno
import hashlib
import logging
import os
import random
import selectors
import socket
import ssl
import time
from collections import deque, namedtuple
from functools import partial
from urllib.parse import quote, unquote, urlsplit

from chatlib.cluster.resp import ConnectionLost, Parser, ProtocolError, RedisError, encode

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE
RECV_SIZE = 1 << 16          # under malloc's mmap threshold: no mmap per read
RETRY_FIRST = 0.05           # seconds before the first reconnection; doubles
RETRY_MAX = 2.0


class RedisAddress(namedtuple("RedisAddress", "host port username password db tls",
                              defaults=(False,))):
    """Where redis listens and how to log in (``tls``: a ``rediss://`` URL);
    printed, it shows ``***`` for the password."""

    __slots__ = ()

    def __str__(self):
        host = "[%s]" % self.host if ":" in self.host else self.host
        user = quote(self.username or "", safe="")
        login = "%s:***@" % user if self.password else "%s@" % user if user else ""
        return "%s://%s%s:%d/%d" % ("rediss" if self.tls else "redis", login, host,
                                    self.port, self.db)

    __repr__ = __str__


def parse_url(url, password_env=None):
    """``redis://[[user]:password@]host[:port][/db]`` as a :class:`RedisAddress`;
    ``rediss://`` for TLS.

    ``password_env`` (the caller passes ``$REDIS_PASSWORD``) is the password
    when the URL has none, so that it need not stand on a command line. The
    ValueError for a malformed URL never repeats it: it may hold a password.
    """
    try:
        parts = urlsplit(url)
    except ValueError as e:                     # "Invalid IPv6 URL"
        raise ValueError("redis URL: %s" % e) from None
    try:
        port = 6379 if parts.port is None else parts.port
    except ValueError:                          # not a number, or out of range
        port = 0
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError("redis URL: it must start with redis:// (or rediss://, for TLS)")
    if parts.query or parts.fragment:
        raise ValueError("redis URL: nothing may follow the database number "
                         "(percent-encode any '?', '#' or '/' in the password)")
    if not parts.hostname:
        raise ValueError("redis URL: no host")
    if not 0 < port < 65536:
        raise ValueError("redis URL: the port must be a number from 1 to 65535")
    db = parts.path[1:]
    if db and not (db.isascii() and db.isdigit()):
        raise ValueError("redis URL: the database must be a number, as in /0")
    password = unquote(parts.password) if parts.password else password_env or None
    return RedisAddress(host=parts.hostname, port=port, password=password, db=int(db or 0),
                        username=unquote(parts.username) if parts.username else None,
                        tls=parts.scheme == "rediss")


class Script:
    """A Lua script, which redis knows by the SHA1 of its source."""

    __slots__ = ("source", "sha")

    def __init__(self, source):
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


class RedisClient:
    """A connection to ``address`` (a :class:`RedisAddress`) on the selector ``sel``.

    ``on_up()`` is called each time a connection is ready: logged in, the
    database selected, every one of ``scripts`` loaded. ``on_down()`` is
    called once when it is lost, after every unanswered command got its
    ConnectionLost; the client then reconnects, backing off. ``name`` tells
    the connections apart in the log.

    With ``rediss://`` the connection is TLS, its certificate checked
    against the system's certificate authorities (or ``$SSL_CERT_FILE``)
    and the host name; the handshake runs in the loop like the rest.
    """

    def __init__(self, address, sel, name, on_up=None, on_down=None, scripts=(),
                 reply_timeout=3.0, log=None):
        self.address = address
        self.sel = sel
        self.name = name
        self.on_up = on_up
        self.on_down = on_down
        self.scripts = tuple(scripts)
        self.reply_timeout = reply_timeout
        self.log = log or logging.getLogger(name)
        self.up = False
        self.sock = None
        self.buffered_bytes = 0       # queued, not yet written
        self._events = 0              # what the selector watches for; 0: not registered
        self._connecting = False
        self._other_addresses = []    # of the host name, to try if this one fails
        self._parser = None
        self._waiting = deque()       # (callback, block) of each unanswered command, in order
        self._out = []                # encoded commands not yet given to send()
        self._unsent = b""            # what the last send() did not take
        self._deadline = None         # when the oldest unanswered command has waited too long
        self._retry_at = None         # when to try connecting again
        self._failures = 0            # attempts failed in a row, for the back-off
        self._logged_level = 0        # the worst level logged in this outage
        self._handshake_left = 0
        self._tls = ssl.create_default_context() if address.tls else None
        self._tls_handshaking = False

    @property
    def pending(self):
        """Commands sent or queued, not answered yet."""
        return len(self._waiting)

    def start(self):
        self._connect()

    def call(self, callback, *args, block=0.0):
        """Queue a command; ``callback(reply)`` gets its reply (maybe a RedisError,
        or a ConnectionLost) once. ``block`` is how much longer than
        ``reply_timeout`` the command may take, as ``XREAD BLOCK`` does."""
        if not self.up:
            raise RuntimeError("redis connection %s is down" % self.name)
        self._queue(callback, args, block)

    def evalsha(self, callback, script, keys, args):
        """Run ``script``; if redis has lost it (``SCRIPT FLUSH``), load it and
        run it once more. That second run goes behind the commands queued since."""
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)

        def on_reply(reply):
            if isinstance(reply, RedisError) and reply.code == "NOSCRIPT" and self.up:
                # Its reply does not matter: had it failed, the EVALSHA says NOSCRIPT.
                self._queue(lambda loaded: None, ("SCRIPT", "LOAD", script.source), 0.0)
                self._queue(callback, command, 0.0)
            else:
                callback(reply)
        self.call(on_reply, *command)

    def flush(self):
        """Write what was queued; the owner calls this at the end of each loop turn."""
        if self._out and self._events == READ:     # connected, and not waiting to write
            self._write()

    def tick(self, now):
        """Time out a reply, or reconnect, when due; ``now`` is ``time.monotonic()``."""
        if self._deadline is not None and now >= self._deadline:
            if self._connecting:
                self._lost(os.strerror(errno.ETIMEDOUT))
                return
            # The reply may be waiting unread: this process may not have run
            # (stopped, suspended) since before the loop last looked.
            if self._parser is not None and not self._tls_handshaking:
                self._read()
            if self._deadline is not None and now >= self._deadline:
                self._lost("no reply within %.1f s" % (self.reply_timeout + self._waiting[0][1]))
        elif self._retry_at is not None and now >= self._retry_at:
            self._connect()

    def next_wakeup(self):
        """The monotonic time at which :meth:`tick` has something to do, or None."""
        return self._deadline if self._deadline is not None else self._retry_at

    def close(self):
        """Close for good: unanswered commands get ConnectionLost; no on_down."""
        self._retry_at = None
        self._drop("closed")

    # --- Connecting ---------------------------------------------------------

    def _connect(self):
        """Start an attempt: the name's addresses in turn (``localhost`` may be
        ``::1`` first, where redis listens on 127.0.0.1 only)."""
        self._retry_at = None
        try:
            addresses = socket.getaddrinfo(self.address.host, self.address.port,
                                           type=socket.SOCK_STREAM)
        except OSError as e:
            self._lost(str(e))
            return
        self._queue_handshake()
        self._connect_to(addresses)

    def _connect_to(self, addresses):
        family, kind, proto, _, sockaddr = addresses[0]
        self._other_addresses = addresses[1:]
        try:
            self.sock = socket.socket(family, kind, proto)
            self.sock.setblocking(False)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            error = self.sock.connect_ex(sockaddr)
        except OSError as e:
            error = e.errno
        if error in (0, errno.EINPROGRESS):
            self._connecting = True
            self._watch(WRITE)
        else:
            self._connect_failed(error)

    def _connect_failed(self, error):
        """Try the host name's next address, if any; else wait for the next attempt."""
        self._close_socket()
        if self._other_addresses:
            self._connect_to(self._other_addresses)
        else:
            self._lost(os.strerror(error) if error else "cannot connect")

    def _queue_handshake(self):
        """AUTH, SELECT and SCRIPT LOADs, pipelined; a PING if none is needed,
        so that "up" always means redis has answered."""
        address = self.address
        commands = []
        if address.password:
            commands.append(("AUTH", address.username, address.password) if address.username
                            else ("AUTH", address.password))
        if address.db:
            commands.append(("SELECT", address.db))
        commands += [("SCRIPT", "LOAD", script.source) for script in self.scripts]
        commands = commands or [("PING",)]
        self._handshake_left = len(commands)
        for command in commands:
            self._queue(partial(self._on_handshake, command[0]), command, 0.0)

    def _on_handshake(self, command, reply):
        if isinstance(reply, ConnectionLost):
            return
        if isinstance(reply, RedisError):      # WRONGPASS, NOAUTH: never the password
            self._lost("%s refused: %s" % (command, reply.message), logging.ERROR)
            return
        self._handshake_left -= 1
        if not self._handshake_left:
            self.up = True
            self._failures = self._logged_level = 0
            self.log.info("%s: redis connection up (%s)", self.name, self.address)
            if self.on_up:
                self.on_up()

    # --- Input and output ---------------------------------------------------

    def _queue(self, callback, args, block):
        data = encode(*args)
        if not self._waiting:
            self._deadline = time.monotonic() + self.reply_timeout + block
        self._waiting.append((callback, block))
        self._out.append(data)
        self.buffered_bytes += len(data)

    def _on_event(self, mask):
        if self._connecting:
            error = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                self._connect_failed(error)
                return
            self._connecting = False
            if self._tls is not None:
                self._start_tls()
                return
            self._connected()
            return
        if self._tls_handshaking:
            self._tls_handshake()
            return
        if mask & WRITE:
            self._write()
        if mask & READ and self.sock is not None:
            self._read()

    def _connected(self):
        self._parser = Parser()
        self._write()                          # AUTH, SELECT, scripts

    def _start_tls(self):
        """Wrap the connected socket; the selector must know the new object."""
        self.sel.unregister(self.sock)
        self._events = 0
        self.sock = self._tls.wrap_socket(self.sock, server_hostname=self.address.host,
                                          do_handshake_on_connect=False)
        self._tls_handshaking = True
        self._tls_handshake()

    def _tls_handshake(self):
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._watch(READ)
            return
        except ssl.SSLWantWriteError:
            self._watch(WRITE)
            return
        except (ssl.SSLError, OSError) as e:
            self._lost("TLS: %s" % (getattr(e, "reason", None) or e))
            return
        self._tls_handshaking = False
        self._connected()

    def _write(self):
        if not self._unsent:
            self._unsent = memoryview(b"".join(self._out))
            self._out = []
        try:
            sent = self.sock.send(self._unsent)
        except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            sent = 0                           # (TLS: the same bytes go again)
        except OSError as e:
            self._lost(e.strerror or str(e))
            return
        self.buffered_bytes -= sent
        self._unsent = self._unsent[sent:]
        self._watch(READ | WRITE if self._unsent or self._out else READ)

    def _read(self):
        try:
            data = self.sock.recv(RECV_SIZE)
            if self._tls is not None:          # a TLS record may hold more than one recv
                while self.sock.pending():
                    data += self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except OSError as e:
            self._lost(e.strerror or str(e))
            return
        if not data:
            self._lost("connection closed by redis")
            return
        parser = self._parser
        try:
            replies = parser.feed(data)
        except ProtocolError as e:
            self._lost("protocol error: %s" % e)
            return
        for reply in replies:
            if not self._waiting:
                self._lost("protocol error: a reply to no command")
                return
            self._waiting.popleft()[0](reply)
            if self._parser is not parser:     # the callback closed the connection
                return
        if replies:
            self._deadline = (time.monotonic() + self.reply_timeout + self._waiting[0][1]
                              if self._waiting else None)

    def _watch(self, events):
        if events != self._events:
            if self._events:
                self.sel.modify(self.sock, events, self._on_event)
            else:
                self.sel.register(self.sock, events, self._on_event)
            self._events = events

    # --- Losing the connection ----------------------------------------------

    def _lost(self, reason, level=logging.WARNING):
        """Drop the connection, log the first failure of an outage, retry later."""
        was_up = self.up
        if level > self._logged_level:
            self._logged_level = level
        else:
            level = logging.DEBUG
        self.log.log(level, "%s: redis at %s unreachable: %s; retrying",
                     self.name, self.address, reason)
        delay = min(RETRY_MAX, RETRY_FIRST * 2 ** min(self._failures, 6))
        self._failures += 1
        self._retry_at = time.monotonic() + delay * random.uniform(0.5, 1.0)
        self._drop(reason)
        if was_up and self.on_down:
            self.on_down()

    def _drop(self, reason):
        """Close the socket; each unanswered command gets ConnectionLost(reason), oldest first."""
        self._close_socket()
        self.up = self._connecting = self._tls_handshaking = False
        self._parser = self._deadline = None
        self._out, self._unsent, self.buffered_bytes = [], b"", 0
        waiting, self._waiting = self._waiting, deque()
        lost = ConnectionLost(reason)
        for callback, _ in waiting:
            callback(lost)

    def _close_socket(self):
        if self.sock is not None:
            if self._events:
                self.sel.unregister(self.sock)
                self._events = 0
            self.sock.close()
            self.sock = None
