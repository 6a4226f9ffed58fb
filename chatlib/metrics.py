"""Metrics in the Prometheus text format (0.0.4), and the one HTTP endpoint.

Three parts, each usable alone:

* :class:`Histogram`: fixed buckets, cheap enough to time every broadcast.
  Each process keeps its own and sends :meth:`Histogram.state` with its
  heartbeat; :meth:`Histogram.merge` sums them.
* :func:`render`: one snapshot dict (the shape is in its docstring) to the
  text that the operator command prints and ``GET /metrics`` serves. Which
  figure becomes which family is the table :data:`FAMILIES`, one row each.
* :class:`MetricsEndpoint`: ``--metrics HOST:PORT``, the one place the
  server speaks HTTP, driven by the supervisor's loop (non-blocking sockets,
  never a thread). What a request head means is decided without I/O by a
  :class:`RequestReader`, and :func:`response` makes the bytes of the answer.
"""

import ipaddress
import math
import re
import socket
import time
from bisect import bisect_left
from typing import NamedTuple, Optional, Tuple

from chatlib.handoff import inherited_by_fork

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds: from half a millisecond (a few local recipients) to 2.5 s (a
# worker far behind); above the last bound is the +Inf bucket alone.
BROADCAST_BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


# -- the histogram ------------------------------------------------------------

class HistogramState(NamedTuple):
    """What a process sends of its histogram: picklable, a tuple.

    ``counts`` holds one count per bucket, *not* cumulative: observations
    at most ``bounds[i]`` and above ``bounds[i - 1]``, and last, those above
    every bound."""
    counts: Tuple[int, ...]
    sum: float
    count: int


class Histogram:
    """Observations counted in fixed buckets (``le``: at most the bound)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds=BROADCAST_BOUNDS):
        bounds = tuple(bounds)
        if not bounds or not all(math.isfinite(b) for b in bounds) \
                or any(a >= b for a, b in zip(bounds, bounds[1:])):
            raise ValueError("histogram bounds must be finite and increasing: %r" % (bounds,))
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)     # the last: above every bound
        self.sum = 0.0

    def observe(self, seconds):
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def state(self):
        return HistogramState(tuple(self.counts), self.sum, sum(self.counts))

    def add(self, state):
        """Count another's observations too (a predecessor's, at an upgrade)."""
        state = HistogramState(*state)
        if len(state.counts) == len(self.counts):
            self.counts = [a + b for a, b in zip(self.counts, state.counts)]
            self.sum += state.sum

    @staticmethod
    def merge(states, bounds=BROADCAST_BOUNDS):
        """The sum of several processes' states (``None``: a process that
        sent none yet); with none, the empty state for ``bounds``."""
        counts = [0] * (len(bounds) + 1)
        total, count = 0.0, 0
        for state in states:
            if state is None:
                continue
            state = HistogramState(*state)
            if len(state.counts) != len(counts):
                raise ValueError("a histogram state of %d buckets, not %d"
                                 % (len(state.counts), len(counts)))
            counts = [a + b for a, b in zip(counts, state.counts)]
            total += state.sum
            count += state.count
        return HistogramState(tuple(counts), total, count)


# -- the text format ----------------------------------------------------------

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"


class Family(NamedTuple):
    """One metric family: where its figure is in the snapshot, and how it
    is shown. A figure that is a dict gives one series per key, in the
    dict's order, the key as the value of label ``label``."""
    name: str
    type: str
    help: str
    path: Tuple[str, ...]           # keys into the snapshot, outermost first
    label: Optional[str] = None
    bounds: Optional[Tuple[float, ...]] = None     # a histogram's


FAMILIES = (
    Family("chat_connections", GAUGE, "Open client connections on this node.",
           ("connections",)),
    Family("chat_users", GAUGE, "Logged-in users on this node.", ("users",)),
    Family("chat_connections_accepted_total", COUNTER, "Client connections accepted.",
           ("accepted",)),
    Family("chat_connections_refused_total", COUNTER,
           "Client connections refused at once, by reason.", ("refused",), "reason"),
    Family("chat_logins_total", COUNTER, "LOGIN commands answered, by result.",
           ("logins",), "result"),
    Family("chat_messages_received_total", COUNTER, "MSG lines received from clients.",
           ("messages",)),
    Family("chat_lines_delivered_total", COUNTER, "Lines delivered to users.",
           ("deliveries",)),
    Family("chat_received_bytes_total", COUNTER, "Bytes received from clients.",
           ("bytes_in",)),
    Family("chat_sent_bytes_total", COUNTER, "Bytes sent to clients.", ("bytes_out",)),
    Family("chat_disconnections_total", COUNTER, "Client connections closed, by reason.",
           ("disconnects",), "reason"),
    Family("chat_process_restarts_total", COUNTER,
           "Child processes replaced after they died, by role.", ("restarts",), "role"),
    Family("chat_tls_handshakes_total", COUNTER, "TLS handshakes finished, by result.",
           ("tls_handshakes",), "result"),
    Family("chat_tls_relayed_connections", GAUGE,
           "TLS connections old workers relay since an upgrade, until they leave.",
           ("tls_relayed",)),
    Family("chat_upgrades_total", COUNTER, "Upgrades done (ctl upgrade).", ("upgrades",)),
    Family("chat_cluster_redis_up", GAUGE, "1 if this node reaches Redis, else 0.",
           ("cluster", "redis_up")),
    Family("chat_cluster_nodes", GAUGE, "Nodes in the cluster, this one included.",
           ("cluster", "nodes")),
    Family("chat_cluster_bus_entries_received_total", COUNTER,
           "Entries read from the cluster bus.", ("cluster", "entries_in")),
    Family("chat_cluster_bus_entries_sent_total", COUNTER,
           "Entries written to the cluster bus.", ("cluster", "entries_out")),
    Family("chat_broadcast_duration_seconds", HISTOGRAM,
           "Time from the sender's worker reading a MSG to the last local "
           "recipient's write.", ("broadcast_seconds",), bounds=BROADCAST_BOUNDS),
    Family("chat_uptime_seconds", GAUGE, "Seconds since the server started.",
           ("uptime_seconds",)),
    Family("chat_workers", GAUGE, "Worker processes running.", ("workers",)),
)


def render(snapshot):
    """The text of ``snapshot``, a dict of this shape (every figure counts
    from the server's start, except those marked "now"; a part missing or
    None leaves its families out, as ``tls_handshakes`` without TLS and
    ``cluster`` outside cluster mode)::

        {"connections": int, "users": int,          # now
         "accepted": int,
         "refused": {"server-full": n, "too-many-connections": n, "banned": n},
         "logins": {"ok": n, "username-taken": n, ...},
         "messages": int, "deliveries": int, "bytes_in": int, "bytes_out": int,
         "disconnects": {"quit": n, "closed": n, ...},
         "restarts": {"acceptor": n, "worker": n, "broker": n},
         "tls_handshakes": {"ok": n, "failed": n} or None,
         "tls_relayed": int or None,                             # now
         "upgrades": int,
         "cluster": {"redis_up": 0 or 1, "nodes": n,             # now
                     "entries_in": n, "entries_out": n} or None,
         "broadcast_seconds": HistogramState with BROADCAST_BOUNDS,
         "uptime_seconds": float, "workers": int}                # now
    """
    lines = []
    for family in FAMILIES:
        figure = _figure(snapshot, family.path)
        if figure is None:
            continue
        samples = list(_samples(family, figure))
        if samples:
            lines.append("# HELP %s %s" % (family.name, _escape_help(family.help)))
            lines.append("# TYPE %s %s" % (family.name, family.type))
            lines.extend(samples)
    return "".join(line + "\n" for line in lines)


def _figure(snapshot, path):
    for key in path:
        if snapshot is None:
            return None
        snapshot = snapshot.get(key)
    return snapshot


def _samples(family, figure):
    if family.type == HISTOGRAM:
        yield from _histogram_samples(family, HistogramState(*figure))
    elif family.label is not None:
        for key, value in figure.items():
            yield _sample(family.name, {family.label: key}, value)
    else:
        yield _sample(family.name, {}, figure)


def _histogram_samples(family, state):
    if len(state.counts) != len(family.bounds) + 1:
        raise ValueError("%s: %d buckets for %d bounds"
                         % (family.name, len(state.counts), len(family.bounds)))
    cumulative = 0
    for bound, count in zip(family.bounds + (math.inf,), state.counts):
        cumulative += count
        yield _sample(family.name + "_bucket", {"le": format_value(bound)}, cumulative)
    yield _sample(family.name + "_sum", {}, state.sum)
    yield _sample(family.name + "_count", {}, cumulative)     # the +Inf bucket's, always


def _sample(name, labels, value):
    if labels:
        name += "{%s}" % ",".join('%s="%s"' % (key, escape_label_value(str(text)))
                                  for key, text in labels.items())
    return "%s %s" % (name, format_value(value))


def format_value(value):
    """A number as the format writes it: an integer in digits, a float as
    Python's ``repr`` (which Go's ParseFloat reads back exactly), ``+Inf``,
    ``-Inf``, ``NaN``."""
    if isinstance(value, int):          # bool included: True is 1
        return "%d" % value
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def escape_label_value(text):
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text):
    return text.replace("\\", "\\\\").replace("\n", "\\n")


# -- HTTP, without I/O ---------------------------------------------------------
#
# The rules a request head is held to, in the order they are applied:
#
# 1. A head (request line, header lines, the empty line) longer than
#    MAX_HEAD bytes: 431, whatever it holds.
# 2. A request line other than ``METHOD SP TARGET SP HTTP/1.0|1.1``, a
#    header line that is not ``name: value``, or HTTP/1.1 without Host
#    (RFC 9112 says MUST), or a target neither a path nor an absolute
#    http(s) URL: 400. A line may end in LF alone, as RFC 9112 allows.
# 3. A path other than /metrics (the query string is ignored): 404.
# 4. A method other than GET and HEAD: 405, with Allow.
# 5. Otherwise 200: the metrics (HEAD: the same head, no body).
#
# Every answer closes the connection: one request each, nothing to keep.

MAX_HEAD = 8192

OK, BAD_REQUEST, NOT_FOUND, NOT_ALLOWED, HEAD_TOO_LARGE, SERVER_ERROR = \
    200, 400, 404, 405, 431, 500
REASONS = {OK: "OK", BAD_REQUEST: "Bad Request", NOT_FOUND: "Not Found",
           NOT_ALLOWED: "Method Not Allowed",
           HEAD_TOO_LARGE: "Request Header Fields Too Large",
           SERVER_ERROR: "Internal Server Error"}
ALLOWED_METHODS = ("GET", "HEAD")
METRICS_PATH = "/metrics"

_TOKEN = r"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(r"(%s) ([\x21-\x7e]+) HTTP/1\.([01])\Z" % _TOKEN)
_HEADER_LINE = re.compile(r"(%s):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*?)[ \t]*\Z" % _TOKEN)
_ABSOLUTE_FORM = re.compile(r"https?://[^/?#]*", re.IGNORECASE)


class Answer(NamedTuple):
    """What to answer a request: its status, and whether the body is left
    out (HEAD)."""
    status: int
    head_only: bool = False


class RequestReader:
    """Bytes of one connection in, cut anywhere; an :class:`Answer` out as
    soon as the request head is complete, or too long already."""

    def __init__(self, max_head=MAX_HEAD):
        self.max_head = max_head
        self.buffer = bytearray()
        self.scanned = 0         # where an end of the head may start that was not looked for
        self.answer = None

    def receive_data(self, data):
        """Add received bytes; the answer once there is one, else None.
        After the answer, bytes are ignored."""
        if self.answer is not None:
            return None
        self.buffer += data
        end = self._head_end()
        if end is None:
            if len(self.buffer) > self.max_head:
                self.answer = Answer(HEAD_TOO_LARGE)
            return self.answer
        if end > self.max_head:
            self.answer = Answer(HEAD_TOO_LARGE)
        else:
            self.answer = decide(bytes(self.buffer[:end]))
        return self.answer

    def _head_end(self):
        """Where the head ends, past its empty line, if it has ended."""
        buffer = self.buffer
        ends = [at + len(blank) for blank in (b"\n\r\n", b"\n\n")
                for at in (buffer.find(blank, self.scanned),) if at >= 0]
        if ends:
            return min(ends)
        self.scanned = max(0, len(buffer) - 2)    # an end may begin in the last two
        return None


def decide(head):
    """The answer to a complete request head (``bytes``, its empty line
    included), by rules 2 to 5."""
    lines = head.decode("latin-1").split("\n")[:-2]      # the empty line, and after it
    lines = [line[:-1] if line.endswith("\r") else line for line in lines]
    request = _REQUEST_LINE.match(lines[0])
    if request is None:
        return Answer(BAD_REQUEST)
    method, target, minor = request.groups()
    head_only = method == "HEAD"
    names = set()
    for line in lines[1:]:
        header = _HEADER_LINE.match(line)
        if header is None:
            return Answer(BAD_REQUEST, head_only)
        names.add(header.group(1).lower())
    if minor == "1" and "host" not in names:
        return Answer(BAD_REQUEST, head_only)
    absolute = _ABSOLUTE_FORM.match(target)
    path = (target[absolute.end():] or "/") if absolute else target
    if not path.startswith("/"):
        return Answer(BAD_REQUEST, head_only)
    if path.split("?", 1)[0] != METRICS_PATH:
        return Answer(NOT_FOUND, head_only)
    if method not in ALLOWED_METHODS:
        return Answer(NOT_ALLOWED, head_only)
    return Answer(OK, head_only)


def http_date(when):
    """An HTTP ``Date`` (RFC 9110, IMF-fixdate): English names whatever the
    locale, which ``time.strftime`` would follow."""
    t = time.gmtime(when)
    return "%s, %02d %s %d %02d:%02d:%02d GMT" % (
        ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")[t.tm_wday], t.tm_mday,
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov",
         "Dec")[t.tm_mon - 1], t.tm_year, t.tm_hour, t.tm_min, t.tm_sec)


def response(answer, metrics_text=None, date=None):
    """The bytes of ``answer``: for a 200, with ``metrics_text`` as its
    body; otherwise a one-line plain body. ``date``: the Date header's
    value (an origin server with a clock sends one), left out if None."""
    if answer.status == OK:
        body, content_type = metrics_text.encode("utf-8"), CONTENT_TYPE
    else:
        body = ("%d %s\n" % (answer.status, REASONS[answer.status])).encode("ascii")
        content_type = "text/plain; charset=utf-8"
    head = ["HTTP/1.1 %d %s" % (answer.status, REASONS[answer.status])]
    if date is not None:
        head.append("Date: " + date)
    head += ["Content-Type: " + content_type, "Content-Length: %d" % len(body)]
    if answer.status == NOT_ALLOWED:
        head.append("Allow: " + ", ".join(ALLOWED_METHODS))
    head += ["Connection: close", "", ""]
    return "\r\n".join(head).encode("ascii") + (b"" if answer.head_only else body)


# -- HTTP, the sockets ---------------------------------------------------------

REQUEST_TIMEOUT = 5.0       # seconds a connection may live, from accept to close
MAX_CONNECTIONS = 64        # at once; one more is closed as soon as accepted
RECV_SIZE = 4096

READING, WRITING, DRAINING = "reading", "writing", "draining"


class _Exchange:
    """One HTTP connection: its request, its answer, and when it must end.

    READING the request, WRITING the answer, then DRAINING: the write side
    is shut and what the client still sends is read and dropped until it
    closes. Closing a socket with unread bytes in it sends a reset, which
    can cost the client the answer it has not read yet (a 431 to a head
    still arriving, a request with a body)."""

    __slots__ = ("sock", "deadline", "reader", "state", "pending_output")

    def __init__(self, sock, deadline):
        self.sock = sock
        self.deadline = deadline
        self.reader = RequestReader()
        self.state = READING
        self.pending_output = memoryview(b"")


class MetricsEndpoint:
    """``GET /metrics`` over HTTP, driven by the caller's loop:

        endpoint.open()                   # OSError: the caller reports it
        while ...:
            ours = endpoint.waitables()
            for obj in wait(others + ours, 0.01 if endpoint.writing else LOOP_TIMEOUT):
                if obj in ours:
                    endpoint.on_ready(obj)
            endpoint.flush()
            endpoint.tick(time.monotonic())
        endpoint.close()

    ``wait`` only waits to read: while an answer is being written (a slow
    or stalled reader), ``writing`` is True and the caller comes back
    soon to ``flush``. No call ever blocks: a client that sends nothing,
    or reads nothing, costs a slot until its ``timeout`` runs out.
    """

    def __init__(self, host, port, render_now, log, timeout=REQUEST_TIMEOUT,
                 max_connections=MAX_CONNECTIONS):
        self.host = host
        self.port = port
        self.render_now = render_now
        self.log = log
        self.timeout = timeout
        self.max_connections = max_connections
        self.listener = None
        self.exchanges = {}       # socket -> _Exchange

    def open(self):
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.create_server((self.host, self.port), family=family)
        listener.setblocking(False)
        self.listener = inherited_by_fork(listener)

    @property
    def address(self):
        """``(host, port)`` as bound."""
        return self.listener.getsockname()[:2]

    def waitables(self):
        """The sockets to wait on for reading."""
        return [self.listener] + [sock for sock, exchange in self.exchanges.items()
                                  if exchange.state != WRITING]

    @property
    def writing(self):
        return any(exchange.state == WRITING for exchange in self.exchanges.values())

    def on_ready(self, sock):
        """``sock``, one of :meth:`waitables`, is ready to read."""
        if sock is self.listener:
            self._accept()
            return
        exchange = self.exchanges.get(sock)
        if exchange is None:
            return
        try:
            data = sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(exchange)
        elif exchange.state == READING:
            answer = exchange.reader.receive_data(data)
            if answer is not None:
                self._answer(exchange, answer)

    def flush(self):
        """Write what the answers being written can take now."""
        for exchange in list(self.exchanges.values()):
            if exchange.state == WRITING:
                self._send(exchange)

    def tick(self, now):
        """Close the connections past their time; ``now`` on the clock of
        ``time.monotonic()``."""
        for exchange in list(self.exchanges.values()):
            if now >= exchange.deadline:
                self.log.debug("metrics: closing a connection after %.1f s (%s)",
                               self.timeout, exchange.state)
                self._close(exchange)

    def close(self):
        for exchange in list(self.exchanges.values()):
            self._close(exchange)
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    def _accept(self):
        for _ in range(self.max_connections):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:        # out of descriptors, a connection aborted
                self.log.warning("metrics: accept failed: %s", exc)
                return
            if len(self.exchanges) >= self.max_connections:
                self.log.debug("metrics: %d connections open, one more closed",
                               len(self.exchanges))
                sock.close()
                continue
            sock.setblocking(False)
            self.exchanges[inherited_by_fork(sock)] = _Exchange(
                sock, time.monotonic() + self.timeout)

    def _answer(self, exchange, answer):
        text = None
        if answer.status == OK:
            try:
                text = self.render_now()
            except Exception:             # a bug in the figures must not stop the server
                self.log.exception("metrics: rendering failed")
                answer = Answer(SERVER_ERROR, answer.head_only)
        output = response(answer, text, http_date(time.time()))
        exchange.pending_output = memoryview(output)
        exchange.state = WRITING
        self._send(exchange)

    def _send(self, exchange):
        try:
            while exchange.pending_output:
                sent = exchange.sock.send(exchange.pending_output)
                exchange.pending_output = exchange.pending_output[sent:]
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(exchange)
            return
        try:
            exchange.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(exchange)
            return
        exchange.state = DRAINING

    def _close(self, exchange):
        del self.exchanges[exchange.sock]
        exchange.sock.close()


# -- the option ----------------------------------------------------------------

_PORT = re.compile(r"[0-9]{1,5}\Z")


def parse_listen(text, default_host="127.0.0.1"):
    """``--metrics``'s value to ``(host, port)``: ``PORT`` (on
    ``default_host``), ``HOST:PORT``, or ``[IPv6]:PORT``; ValueError
    saying what is wrong otherwise."""
    if text.startswith("["):
        host, bracket, port = text[1:].partition("]:")
        if not bracket:
            raise ValueError("%r: an IPv6 address is written [ADDRESS]:PORT" % text)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError("%r: not an IPv6 address between the brackets" % text) from None
    else:
        host, colon, port = text.rpartition(":")
        if not colon:
            host = default_host
        elif ":" in host:
            raise ValueError("%r: an IPv6 address goes between brackets, as in [::1]:9464"
                             % text)
        elif not host:
            raise ValueError("%r: no host before the colon; write PORT alone for %s, "
                             "or 0.0.0.0:PORT for every interface" % (text, default_host))
        elif any(c.isspace() or c in "[]" for c in host):
            raise ValueError("%r: not a host name or address" % text)
    if not _PORT.match(port) or int(port) > 65535:
        raise ValueError("%r: the port must be a number from 0 to 65535" % text)
    return host, int(port)
