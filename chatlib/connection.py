"""One client connection as a worker holds it, and its write path.

A :class:`Client` is the socket (or the ``chatlib.tls.TlsStream`` standing
in for it), the line reader, the output owed to it and the state the
worker's routing keeps per connection. The write path is here because it is
surgery on the output list: everything owed goes out with one ``send`` or
``sendmsg`` of the list as it is (scatter-gather: no join, no copy), what the
kernel does not take stays at the head of the list, and a connection that is
cut gets what is left of the line in flight and its last line, no more.

The worker's fan-out appends to ``out`` and ``out_bytes`` directly, in its
own loops: per recipient that is one append, not a call.
"""

import os
import selectors
import socket

from chatlib.protocol import LineReader

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE
try:                      # buffers per sendmsg (Linux and macOS: 1024)
    IOV_MAX = os.sysconf("SC_IOV_MAX")
except (AttributeError, ValueError, OSError):
    IOV_MAX = 16           # what POSIX guarantees


class Client:
    """One connection. Kept small: twenty thousand of these must fit."""

    __slots__ = ("sock", "cid", "ip", "name", "name_b", "login_stamp", "reader",
                 "out", "out_bytes", "midline", "connected", "last_line", "held",
                 "waiting", "request", "closing", "interest", "tokens",
                 "refilled", "throttled_since", "logged_in_at", "bytes_in", "bytes_out",
                 "relayed_port")

    def __init__(self, sock, cid, ip, max_line, now, burst):
        self.sock = sock
        self.cid = cid
        self.ip = ip
        self.name = None           # str once logged in
        self.name_b = None         # the same, as bytes, for formatting lines
        self.login_stamp = 0       # when the broker granted the name (WHO order)
        self.reader = LineReader(max_line)
        self.out = []              # bytes owed to the socket, in order
        self.out_bytes = 0
        self.midline = False       # out[0] starts in the middle of a line
        self.connected = now       # for the login timeout
        self.last_line = now       # when its lines last ran, for the idle timeout
        self.held = None           # lines read but not yet run
        self.waiting = False       # a request to the broker is unanswered
        self.request = None        # that request, to resend to a new broker
        self.closing = None        # why we stop reading it (QUIT, EOF)
        self.interest = 0          # selector events registered
        self.tokens = burst        # flood control's bucket (chatlib.flood):
        self.refilled = now        # lines it may send now, since when,
        self.throttled_since = None    # and since when it is over the rate
        self.logged_in_at = None   # wall-clock time of the login, for the operator
        self.bytes_in = 0          # received and sent on this connection
        self.bytes_out = 0
        self.relayed_port = None   # a TLS connection an old worker relays (chatlib.upgrade):
                                   # its peer's port, which a socket pair cannot say

    # -- writing --------------------------------------------------------------

    def write(self, writable):
        """Send what is owed with one system call; the number of bytes sent.

        While waiting for writability nothing is tried, unless ``writable``
        says the selector reported it. OSError: the connection is broken.
        """
        out = self.out
        if not out or (not writable and self.interest & WRITE):
            return 0
        if len(out) > IOV_MAX:
            out[:] = [b"".join(out)]
        try:
            sent = self.sock.send(out[0]) if len(out) == 1 else self.sock.sendmsg(out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        if sent == self.out_bytes:
            out.clear()
            self.out_bytes = 0
            self.midline = False
        else:
            self.consume(sent)
        return sent

    def consume(self, sent):
        """Forget the first ``sent`` bytes of ``out``."""
        if sent:
            self.out_bytes -= sent
            self.midline = drop_sent(self.out, sent) not in (None, b"\n")

    def last_words(self, line):
        """Send what the socket takes at once of all that is owed, then ``line``.

        True when all of it went out. Otherwise what is left to drain becomes
        the output: the rest of the line in flight and ``line`` (over TLS,
        the records in flight and ``line``: ``TlsStream.cut``); the lines
        after the one in flight are forgotten.
        """
        data = b"".join(self.out) + line
        sock = self.sock
        if type(sock) is socket.socket:
            try:
                sent = sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                sent = len(data)
            if sent == len(data):
                return True
            rest = data[sent:]
            if len(rest) > len(line):
                in_flight = self.midline if not sent else data[sent - 1:sent] != b"\n"
                rest = (rest[:rest.find(b"\n") + 1] if in_flight else b"") + line
        elif sock.cut(data, line):
            return True
        else:
            rest = line
        self.out[:] = [rest]
        self.out_bytes = len(rest)
        return False

    # -- the selector ---------------------------------------------------------

    def watch(self, sel, write):
        """Register on ``sel`` for what the connection waits for: reading,
        unless it has lines held or is closing; and ``write`` (WRITE or 0)."""
        want = (0 if (self.held is not None or self.closing) else READ) | write
        if want != self.interest:          # on the hot path: most calls change nothing
            self.interest = set_interest(sel, self.sock, self.interest, want, self)

    def update_interest(self, sel):
        """Re-derive the read interest; keep waiting for writability if we were."""
        self.watch(sel, self.interest & WRITE)

    def leave(self, sel):
        """Leave ``sel``, keeping the socket (an upgrade hands it over)."""
        if self.interest:
            sel.unregister(self.sock)
            self.interest = 0

    def close(self, sel):
        """Leave ``sel`` and close the socket (the worker forgets the rest)."""
        self.leave(sel)
        try:
            self.sock.close()
        except OSError:
            pass
        self.sock = None


def set_interest(sel, fileobj, have, want, data):
    """Make ``fileobj``'s registration on ``sel`` ``want`` (events, 0 for
    none) where it was ``have``; return ``want``."""
    if want == have:
        return have
    if not want:
        sel.unregister(fileobj)
    elif not have:
        sel.register(fileobj, want, data)
    else:
        sel.modify(fileobj, want, data)
    return want


def drop_sent(buffers, sent):
    """Forget the first ``sent`` bytes of ``buffers``, what a partial
    ``sendmsg`` took: the buffers it took whole go, the one it cut keeps its
    rest at the head. The last byte sent of the buffer cut, or None if none
    was."""
    i = 0
    while sent and sent >= len(buffers[i]):
        sent -= len(buffers[i])
        i += 1
    del buffers[:i]
    if not sent:
        return None
    head = buffers[0]
    buffers[0] = head[sent:]
    return head[sent - 1:sent]
