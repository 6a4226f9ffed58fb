#!/usr/bin/env python3
"""chat-stress: load the chat server and check every line it sends back.

Each scenario runs in phases driven by one coordinator process: ``setup``
(every client connects and logs in), ``run`` (the load), ``finish`` (wait
for lines still in flight, then judge). The load comes from ``--procs``
processes, each running one selectors loop over its share of the clients:
large reads, lines counted in bulk, payloads built once, sends batched.

Every scenario carries a correctness oracle that stays cheap under load:
each receiver keeps, per sender, the next sequence number it expects, so a
lost, duplicated, reordered, echoed, misrouted or cut line is caught without
storing what arrived. A read of many MSG lines is judged in bulk, in a
few C calls (see ``Broadcast.bulk_check``). Any failure makes the exit
status 1 and is listed. When the tool's own CPU, not the server, was the
limit, the result says so (``tool_bound``).

Against a cluster, ``--port P1,P2`` (or ``--target HOST:PORT``, repeated)
sends client i to the (i mod n)-th node, and the same oracle holds across
nodes; ``--spawn-cluster N`` starts a Redis and N nodes for the run and
reports what Redis did (``redis_calls``, ``redis_cpu_s``).

With ``--tls`` every client speaks TLS (a sans-IO ``ssl.SSLObject`` per
client, ``scripts/tlsclient.py``; the certificate is not checked) and the
oracle is the same. ``--spawn-server`` and ``--spawn-cluster`` then make a
throw-away self-signed certificate with ``openssl`` and start the servers
``--tls-only``; against running servers, ``--port`` and ``--target`` name
their TLS ports. Without ``--tls`` no TLS code runs at all: ``OverTls`` is
mixed into a scenario only for a TLS run.

``--ctl COMMAND`` sends an operator's command to the control socket of the
server ``--spawn-server`` starts, before the load: ``--ctl 'ban 127.0.0.0/8'``
for ``refused``, whose every connection must get ``ERR banned`` and EOF.

``connect --password PW`` logs every client in with ``LOGIN NAME PW``;
with ``--spawn-server`` the tool first registers their names through the
same control socket (``account add``, ~40 ms of hashing each), so that
``logins_per_s`` measures password logins.

``upgrade`` runs fanout's load at a steady rate on a server it spawns (a
share of the clients over TLS, newcomers arriving all along) while
``broker.py ctl upgrade`` moves every connection into new processes,
``--upgrades`` times: nobody may be closed or sent ``INFO``, no line lost,
doubled, reordered or cut, not even one written half before an upgrade and
half after. Each command is timed, the lines' delays are split by whether an
upgrade was under way, and the server's processes, descriptors and memory
are compared before the first and after the last (an old process left is a
failure, unless it relays TLS connections).

``dm --attack N`` and ``ping --attack N`` add N connections that guess
the passwords of registered names, as fast as the answers come, through
the run (see ``UnderAttack``); the scenario's figures are those a run
without reports, for a direct comparison.

Standard library only; Linux for the server figures (read from /proc).
"""

import argparse
import array
import ipaddress
import json
import multiprocessing
import multiprocessing.connection
import os
import random
import re
import secrets
import selectors
import shlex
import shutil
import signal
import socket
import ssl
import string
import subprocess
import sys
import tempfile
import threading
import time
from bisect import bisect_left, bisect_right
from collections import Counter, namedtuple
from operator import itemgetter

if not __package__:     # run as a file, python3 scripts/stress.py: see __init__.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = os.path.basename(os.path.dirname(os.path.abspath(__file__)))

from chatlib.accounts import MAX_FAILURES  # noqa: E402
from chatlib.control.commands import takes_secret  # noqa: E402
from chatlib.control.server import is_last_line  # noqa: E402
from chatlib.supervisor import raise_nofile_limit  # noqa: E402

from .harness import BROKER, OPENSSL_HINT, Server, StartError, percentile, self_signed, start_cluster  # noqa: E402
from .procfs import (STARTTIME, cpu_wait, process_role, process_tree, socket_inodes,  # noqa: E402
                     stat, tcp_sockets, usage)
from .tlsclient import TlsClient, client_context  # noqa: E402

CHUNK = 256 * 1024          # bytes per recv: few syscalls, lines counted in bulk
PER_ADDRESS = 50            # clients per 127.x source address (server default cap: 64)
LAT_STRIDE = 10             # one client in this many records latency samples
SAMPLE_STRIDE = 50          # --check sample: one receiver in this many checks (and times)
MAX_BATCH = 512             # messages a sender writes per loop turn
WINDOW_BYTES = 256 * 1024   # in-flight bytes per receiver the senders allow
ACK_EVERY = 0.025           # seconds between publications of receivers' progress
CHECK_EVERY = 0.05          # seconds between "is everything in?" checks
SAMPLES_PER_KIND = 3        # example details kept per kind of failure
BULK_LINES = 16             # reads of at least this many lines are checked in bulk
EXPECT_BLOCK = 256          # expected MSG lines built at a time, per sender
TOOL_BOUND = 0.85           # of its cores: the tool, not the server, was the limit
BIG = 1 << 62               # "no constraint" in shared progress slots
CTL_TIMEOUT = 10.0          # seconds a --ctl command may take to be answered
CTL_AHEAD = 8               # commands sent ahead of their answers on the control socket
CONCURRENCY = 200           # connects + logins in flight per process, by default
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
UPGRADE_TIMEOUT = 60.0      # seconds one ctl upgrade may take (the server gives up sooner)
HALVES_TIMEOUT = 5.0        # seconds the processes get to write their first halves
UPGRADE_SAID = re.compile(r" in ([\d.]+) s: (\d+) connections moved")

# Board slots per process: shared memory the coordinator reads for progress,
# and in the upgrade scenario its word to the processes (UPGRADE_STARTING,
# UPGRADE_DONE, RUN_OVER) and their answer (HALVES_SENT).
CONNECTED, SENT, RECEIVED, SLOW_CLOSED, UPGRADE_STARTING, HALVES_SENT, UPGRADE_DONE, \
    RUN_OVER, BOARD_SLOTS = range(9)
# Client states.
CONNECTING, LOGGING_IN, READY, LEAVING, CLOSED, GUESSING = range(6)


# -- machine and /proc ---------------------------------------------------------

def own_cpu():
    """CPU seconds this process has used (user + system)."""
    t = os.times()
    return t.user + t.system


def source_address(index):
    """The loopback source address of client ``index``: PER_ADDRESS per address."""
    k = index // PER_ADDRESS
    return "127.%d.%d.%d" % (100 + k // 62500, k // 250 % 250, k % 250 + 1)


# -- one stress process ----------------------------------------------------------

class Client:
    """One connection and its oracle state."""

    __slots__ = ("idx", "name", "sock", "state", "out", "carry", "interest", "t0",
                 "seq", "got", "nxt", "lat", "peer", "slow", "cut", "observer", "infos",
                 "kind", "tls", "counting")

    def __init__(self, idx, name):
        self.idx = idx
        self.name = name            # bytes
        self.sock = None
        self.state = CLOSED
        self.out = b""              # bytes the socket has not taken yet
        self.carry = b""            # an incomplete last line
        self.interest = 0
        self.t0 = 0
        self.seq = 0                # next sequence number this client sends
        self.got = 0                # next sequence number it expects (one sender)
        self.nxt = {}               # sender -> next sequence number expected
        self.lat = False            # records latency samples
        self.peer = None
        self.slow = False
        self.cut = False            # has seen ERR slow-consumer
        self.observer = False
        self.infos = None
        self.kind = 0
        self.tls = None             # its TlsClient, with --tls
        self.counting = False       # counts its lines instead of checking them (--check sample)


class Load:
    """One stress process: a selectors loop over its share of the clients.

    Subclasses say who the clients are and what the lines they get must be;
    this class connects and logs them in, moves bytes, serves the
    coordinator's phase commands and keeps the book of failures.
    """

    def __init__(self, cfg, proc, pipe, board):
        self.cfg = cfg
        self.proc = proc
        self.pipe = pipe
        self.board = board
        self.slot = proc * BOARD_SLOTS
        self.sel = selectors.DefaultSelector()
        self.sel.register(pipe.fileno(), selectors.EVENT_READ, None)
        self.targets = cfg["targets"]
        self.spread = cfg["spread"]
        self.failures = Counter()
        self.examples = {}
        self.connected = 0
        self.running = False        # in the run phase's window
        self.sent = 0
        self.lines_in = 0
        self.logins_pending = 0
        self.login_ns = array.array("q")
        self.login_span = [0, 0]
        self.last_rx = 0
        self.now = time.monotonic_ns()
        self.clients = self.make_clients()

    # subclass hooks
    def make_clients(self):
        """The clients this process logs in during setup."""
        raise NotImplementedError

    def on_login(self, c):
        """``c`` got its OK."""

    def on_lines(self, c, lines):
        """Complete lines for a logged-in ``c``, in order."""
        raise NotImplementedError

    def on_eof(self, c):
        """The server closed ``c``: a failure unless we were leaving."""
        if c.state != LEAVING:
            self.fail("lost-connection", self.about(c))
        self.close(c)

    def tick(self):
        """Called once per loop turn: senders, periodic checks."""

    def about(self, c):
        """``c`` as a failure's example shows it."""
        return c.name

    # failure book
    def fail(self, kind, detail="", count=1):
        self.failures[kind] += count
        examples = self.examples.setdefault(kind, [])
        if len(examples) < SAMPLES_PER_KIND:
            text = detail.decode("utf-8", "replace") if isinstance(detail, bytes) else str(detail)
            examples.append(text[:160])

    def unexpected(self, c, line):
        self.fail("unexpected-line", b"%s got %r" % (c.name, line[:100]))

    # sockets
    def open(self, c):
        """Start a non-blocking connect, from a spread loopback address if local."""
        c.t0 = time.monotonic_ns()
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if c.slow:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            if self.spread:
                s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                s.bind((source_address(c.idx), 0))
            err = s.connect_ex(self.target(c))
        except OSError as exc:
            err = exc.errno
        if err not in (0, 115, 36, 11, 35):     # EINPROGRESS, EAGAIN (Linux, BSD)
            s.close()
            self.fail("connect-failed", "%s: %s" % (c.name.decode(), os.strerror(err)))
            return False
        c.sock = s
        c.state = CONNECTING
        self.logins_pending += 1
        self.set_interest(c, selectors.EVENT_WRITE)
        return True

    def target(self, c):
        """The (address, port) ``c`` connects to: the (idx mod n)-th target."""
        return self.targets[c.idx % len(self.targets)]

    def set_interest(self, c, want):
        if want == c.interest or c.sock is None:
            return
        if not want:
            self.sel.unregister(c.sock)
        elif not c.interest:
            self.sel.register(c.sock, want, c)
        else:
            self.sel.modify(c.sock, want, c)
        c.interest = want

    def write(self, c, data):
        """Send ``data`` now if the socket takes it, keep the rest for later."""
        if c.sock is None:
            return
        if c.out:
            c.out += data
            return
        try:
            n = c.sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as exc:
            self.fail("send-failed", "%s: %s" % (c.name.decode(), exc))
            self.close(c)
            return
        if n < len(data):
            c.out = data[n:]
            self.set_interest(c, c.interest | selectors.EVENT_WRITE)

    send_raw = write    # bytes for the wire as they are (OverTls.write encrypts first)

    def half_close(self, c):
        c.sock.shutdown(socket.SHUT_WR)

    def close(self, c):
        if c.sock is None:
            return
        if c.interest:
            self.sel.unregister(c.sock)
        c.interest = 0
        c.sock.close()
        c.sock = None
        if c.state in (CONNECTING, LOGGING_IN):
            self.logins_pending -= 1
        elif c.state in (READY, LEAVING):
            self.connected -= 1
        c.state = CLOSED

    def on_writable(self, c):
        if c.state == CONNECTING:
            err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.fail("connect-failed", "%s: %s" % (c.name.decode(), os.strerror(err)))
                self.close(c)
                return
            c.state = LOGGING_IN
            self.set_interest(c, selectors.EVENT_READ)
            self.start_session(c)
            return
        out, c.out = c.out, b""
        self.set_interest(c, c.interest & ~selectors.EVENT_WRITE)
        self.send_raw(c, out)

    def start_session(self, c):
        """``c`` is connected: log in."""
        self.write(c, b"LOGIN %s\n" % c.name)

    def on_readable(self, c):
        try:
            data = c.sock.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.on_eof(c)
            return
        self.received(c, data)

    def received(self, c, data):
        """What the server sent ``c``, a read's worth, as it came."""
        self.last_rx = self.now
        lines = (c.carry + data if c.carry else data).split(b"\n")
        c.carry = lines.pop()
        self.lines_in += len(lines)
        if not lines:
            return
        if c.state == LOGGING_IN:
            if not self.logged_in(c, lines[0]):
                return
            del lines[0]
        if lines:
            self.on_lines(c, lines)

    def logged_in(self, c, answer):
        """Judge the answer to LOGIN; True if ``c`` may go on."""
        if answer != b"OK":
            self.fail("login-failed", b"%s: %r" % (c.name, answer))
            self.close(c)           # still LOGGING_IN: one login less pending
            return False
        self.logins_pending -= 1
        c.state = READY
        self.connected += 1
        self.login_ns.append(self.now - c.t0)
        self.login_span[0] = self.login_span[0] or c.t0
        self.login_span[1] = self.now
        self.on_login(c)
        return c.sock is not None

    def pump(self, timeout):
        """Handle socket events for up to ``timeout`` s; True if the coordinator spoke."""
        command = False
        for key, events in self.sel.select(timeout):
            c = key.data
            if c is None:
                command = True
                continue
            self.now = time.monotonic_ns()
            if events & selectors.EVENT_WRITE and c.sock is not None:
                self.on_writable(c)
            if events & selectors.EVENT_READ and c.sock is not None:
                self.on_readable(c)
        self.now = time.monotonic_ns()
        self.tick()
        board, i = self.board, self.slot
        board[i + CONNECTED] = self.connected
        board[i + SENT] = self.sent
        board[i + RECEIVED] = self.lines_in
        return command

    def pump_until(self, deadline_ns, done=lambda: False, timeout=0.005):
        """Pump until ``done()`` or the deadline; ``done`` is polled every CHECK_EVERY."""
        check = 0
        while self.now < deadline_ns:
            if self.now >= check:
                if done():
                    return True
                check = self.now + int(CHECK_EVERY * 1e9)
            self.pump(timeout)
        return done()

    # phases
    def serve(self):
        """Run the coordinator's phase commands until it says exit."""
        while True:
            while not self.pump(0.05):
                pass
            cmd, *args = self.pipe.recv()
            if cmd == "exit":
                break
            reply = getattr(self, "phase_" + cmd)(*args)
            reply.setdefault("cpu", own_cpu())
            reply.update(wait=cpu_wait(), lines_sent=self.sent)
            self.pipe.send(reply)
        for c in self.clients:
            self.close(c)

    def phase_setup(self):
        """Connect and log in every client, ``concurrency`` at a time."""
        todo = self.clients[::-1]
        limit = self.cfg["concurrency"]
        deadline = self.now + int(self.cfg["setup_timeout"] * 1e9)
        while todo or self.logins_pending:
            while todo and self.logins_pending < limit:
                self.open(todo.pop())
            self.pump(0.01)
            if self.now > deadline:
                self.fail("setup-timeout", "%d logins unanswered" % (self.logins_pending + len(todo)))
                break
        return {"ok": len(self.login_ns), "span": self.login_span,
                "login_ns": self.login_ns.tobytes()}

    def run_window(self, t_start, t_end, begin, done=lambda: False):
        """Wait for ``t_start``, ``begin()``, and pump until ``t_end`` (or
        ``done()``), ``running`` meanwhile."""
        self.pump_until(t_start, timeout=0.001)
        self.running = True
        begin()
        self.pump_until(t_end, done)
        self.running = False

    def finish_round_trips(self, timers, deadline, what):
        """The finish phase of a scenario whose ``timers`` wait for answers
        (``got`` catching up with ``seq``): those still waiting at the
        deadline lost some; the reply carries the round trips (``rtt``)."""
        def drained():
            return all(c.got >= c.seq for c in timers if c.sock is not None)

        complete = self.pump_until(deadline, drained)
        for c in timers:
            if c.sock is not None and c.got < c.seq:
                self.fail("lost", b"%s: %d %s unanswered" % (c.name, c.seq - c.got, what))
        return self.report({"rtt": self.rtt.tobytes(), "complete": complete})

    def report(self, extra):
        """The finish reply: failures, CPU and the scenario's figures."""
        extra.update(failures=dict(self.failures), examples=self.examples,
                     cpu=own_cpu(), lines=self.lines_in, last_rx=self.last_rx)
        return extra


class MessageCheck:
    """The MSG oracle shared by scenarios: fixed-format texts with sequence numbers.

    A text is ``<seq:10> <send-time-ns:19> <pad>``; the send time is non-zero
    on every ``sample``-th message only. The pad is built once and compared
    whole, so a cut or corrupted line cannot pass.
    """

    def __init__(self, size, sample):
        self.pad = b"x" * max(1, size - 31)
        self.fmt = b"MSG %010d %019d " + self.pad + b"\n"
        self.sample = sample
        self.blocks = {}            # (sender, block number) -> its lines, stamps 0

    def batch(self, first, count, stamp):
        sample, fmt = self.sample, self.fmt
        return b"".join([fmt % (q, stamp if q % sample == 0 else 0)
                         for q in range(first, first + count)])

    def expected(self, sender, first, count):
        """What ``sender``'s MSGs ``first`` .. ``first + count - 1`` look like
        to a receiver, stamps 0, each ending in ``\\n``.

        Built a block of lines at a time and shared by every receiver of the
        process; a block far behind the newest is dropped.
        """
        parts, end = [], first + count
        while first < end:
            b = first // EXPECT_BLOCK
            base = b * EXPECT_BLOCK
            block = self.blocks.get((sender, b))
            if block is None:
                fmt = b"MSG " + sender + b" %010d " + b"0" * 19 + b" " + self.pad + b"\n"
                block = b"".join([fmt % q for q in range(base, base + EXPECT_BLOCK)])
                self.blocks[(sender, b)] = block
                self.blocks.pop((sender, b - 4), None)
            size = len(block) // EXPECT_BLOCK
            stop = min(end, base + EXPECT_BLOCK)
            parts.append(block[(first - base) * size:(stop - base) * size])
            first = stop
        return b"".join(parts)

    def parse(self, line):
        """(sender, seq, stamp) of a well-formed MSG line, else None."""
        parts = line.split(b" ", 4)
        if len(parts) == 5 and parts[0] == b"MSG" and parts[4] == self.pad:
            try:
                return parts[1], int(parts[2]), int(parts[3])
            except ValueError:
                return None
        return None


class Broadcast(Load):
    """fanout and slow: senders MSG everyone; receivers check every line.

    Senders are flow-controlled: a sender runs at most a window of messages
    ahead of the slowest checking receiver (published per process in shared
    memory), so "as fast as possible" measures the server, not a queue
    that ends in ``ERR slow-consumer`` for a reader the tool itself starved.

    With ``--check sample`` only the receivers that time messages (one in
    fifty) check every line; the others count the bytes they get, which costs
    the tool nothing per line (every MSG line a receiver gets has one
    length: the names have one length, the texts one format): a lost,
    doubled or foreign line still shows, as a wrong count at the end, while
    order and content are checked by the samplers alone. That is the mode
    for measuring a server faster than the checks.
    """

    def __init__(self, cfg, proc, pipe, board, acks, flags):
        self.acks = acks
        self.flags = flags
        self.msg = MessageCheck(cfg["size"], cfg["sample"])
        super().__init__(cfg, proc, pipe, board)
        self.window = cfg["window"] or max(8, WINDOW_BYTES // ((len(self.msg.fmt) + 8)
                                                               * cfg["senders"]))
        self.lines0 = 0
        self.t_start = 0
        self.next_ack = 0
        self.next_flags = 0
        self.lat = array.array("q")
        self.lat_sent = array.array("q")    # when each of those lines was sent
        self.slow_closed = 0
        self.line_len = len(self.msg.expected(self.sender_names[0], 0, 1))
        self.rx_buffer = bytearray(CHUNK)

    def make_clients(self):
        cfg, prefix = self.cfg, self.cfg["prefix"]
        width = len(str(cfg["senders"] - 1))         # one length: see bulk_check
        names = [b"%ss%0*d" % (prefix, width, i) for i in range(cfg["senders"])]
        self.name_key = itemgetter(slice(4, 4 + len(names[0])))
        self.stamp_at = len(names[0]) + 16
        self.sender_names = names
        self.slow_names = {}
        clients = []
        for i in range(self.proc, cfg["clients"], cfg["procs"]):
            c = Client(i, names[i] if i < len(names) else b"%sr%d" % (prefix, i))
            c.nxt = dict.fromkeys(names, 0)
            c.nxt[c.name] = BIG            # echoes show up as disorder
            stride = SAMPLE_STRIDE if cfg["check"] == "sample" else LAT_STRIDE
            c.lat = i // cfg["procs"] % stride == 0         # some in every process
            c.slow = i >= cfg["senders"] and i in cfg["slow_set"]
            c.counting = cfg["check"] == "sample" and not c.lat and not c.slow
            c.infos = Counter()
            clients.append(c)
        self.senders = [c for c in clients if c.idx < len(names)]
        self.readers = [c for c in clients if not c.slow]
        self.checkers = [c for c in self.readers if not c.counting]
        self.slow = [c for c in clients if c.slow]
        for i in cfg["slow_set"]:
            self.slow_names[b"%sr%d" % (prefix, i)] = i
        return clients

    def on_login(self, c):
        if c.slow:
            self.set_interest(c, 0)     # stop reading: let the server's queue grow

    def on_readable(self, c):
        if not c.counting or c.state != READY or c.tls is not None:
            return super().on_readable(c)
        try:
            size = c.sock.recv_into(self.rx_buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            size = 0
        if not size:
            self.on_eof(c)
            return
        self.count(c, size)

    def received(self, c, data):
        if c.counting and c.state == READY:
            self.count(c, len(data))
        else:
            super().received(c, data)

    def count(self, c, size):
        """A counting receiver got ``size`` more bytes (``c.got``: all of them)."""
        self.lines_in += (c.got + size) // self.line_len - c.got // self.line_len
        c.got += size
        self.last_rx = self.now

    def on_lines(self, c, lines):
        if c.counting:          # the read that brought its OK; from now on, bytes
            c.got += len(lines) * self.line_len + len(c.carry)
            c.carry = b""
            return
        if len(lines) >= BULK_LINES and not c.cut and self.bulk_check(c, lines):
            return
        nxt, parse = c.nxt, self.msg.parse
        for line in lines:
            m = parse(line)
            if m is None:
                self.other_line(c, line)
                continue
            sender, seq, stamp = m
            if c.cut:
                self.fail("line-after-err-slow-consumer", b"%s got %r" % (c.name, line[:80]))
            expected = nxt.get(sender)
            if seq == expected:
                nxt[sender] = seq + 1
                if stamp and c.lat:
                    self.lat.append(self.now - stamp)
                    self.lat_sent.append(stamp)
            else:
                self.disorder(c, sender, seq, expected)

    def bulk_check(self, c, lines):
        """Account for ``lines`` at once if they are all the MSGs ``c``
        expects next, each sender's in order; else change nothing, False.

        Sender names have one length, so a stable sort on the name groups
        the lines by sender, each group in the order it came. A group must
        then be, byte for byte, the next lines of that sender (stamps aside):
        the same verdict as the line-by-line check, in a few C calls.
        """
        key, at, sample, nxt = self.name_key, self.stamp_at, self.msg.sample, c.nxt
        ordered = sorted(lines, key=key)
        done, stamps, i = {}, [] if c.lat else None, 0
        while i < len(ordered):
            sender = key(ordered[i])
            first = nxt.get(sender, BIG)
            end = bisect_left(ordered, b"MSG " + sender + b"!", i)
            if first >= BIG or end <= i or sender in done:
                return False
            group = ordered[i:end]
            for g in range((-first) % sample, end - i, sample):    # stamped lines
                line = group[g]
                stamp = line[at:at + 19]
                if not stamp.isdigit():
                    return False
                if stamps is not None and int(stamp):
                    stamps.append(int(stamp))
                group[g] = line[:at] + b"0" * 19 + line[at + 19:]
            joined = b"\n".join(group)
            want = self.msg.expected(sender, first, end - i)
            if len(want) != len(joined) + 1 or not want.startswith(joined):
                return False
            done[sender] = first + end - i
            i = end
        nxt.update(done)
        if stamps:
            self.lat.extend([self.now - stamp for stamp in stamps])
            self.lat_sent.extend(stamps)
        return True

    def disorder(self, c, sender, seq, expected):
        if sender == c.name:
            self.fail("echo-to-sender", b"%s got its own message %d" % (sender, seq))
        elif expected is None:
            self.fail("unknown-sender", b"%s got MSG from %s" % (c.name, sender))
        elif seq > expected:
            self.fail("lost", b"%s: %s seq %d..%d missing" % (c.name, sender, expected, seq - 1),
                      seq - expected)
            c.nxt[sender] = seq + 1
        else:
            self.fail("duplicate-or-reordered",
                      b"%s: %s seq %d after %d" % (c.name, sender, seq, expected - 1))

    def other_line(self, c, line):
        """INFO about a slow client, or ERR slow-consumer to one; else a failure."""
        if line == b"ERR slow-consumer" and c.slow and not c.cut:
            c.cut = True
            return
        parts = line.split(b" ")
        if len(parts) == 3 and parts[0] == b"INFO" and parts[2] == b"disconnected" \
                and parts[1] in self.slow_names and not c.cut:
            c.infos[parts[1]] += 1
            self.flags[self.slow_names[parts[1]]] = 1
            return
        self.unexpected(c, line)

    def on_eof(self, c):
        if c.slow and c.cut:
            self.slow_closed += 1
            self.board[self.slot + SLOW_CLOSED] = self.slow_closed
            c.state = LEAVING
        elif c.slow:
            self.fail("closed-without-err-slow-consumer", c.name)
            c.state = LEAVING
        super().on_eof(c)

    def tick(self):
        now = self.now
        if now >= self.next_ack:
            self.next_ack = now + int(ACK_EVERY * 1e9)
            self.publish_progress()
            if self.slow:
                self.resume_cut(force=False)
        if self.running:
            self.feed_senders(now)

    def publish_progress(self):
        """Per sender, the next seq the slowest checking receiver here waits for."""
        base = self.proc * len(self.sender_names)
        readers = [c.nxt for c in self.checkers if c.sock is not None]
        for s, name in enumerate(self.sender_names):
            self.acks[base + s] = min([nxt[name] for nxt in readers], default=BIG)

    def resume_cut(self, force):
        """Slow clients the server cut (others saw their INFO) read what is left."""
        for c in self.slow:
            if c.sock is not None and c.state == READY and not c.interest \
                    and (force or self.flags[c.idx]):
                self.set_interest(c, selectors.EVENT_READ)

    def feed_senders(self, now):
        procs, n_senders, acks = self.cfg["procs"], len(self.sender_names), self.acks
        rate = self.cfg["rate"] / n_senders if self.cfg["rate"] else 0
        for c in self.senders:
            if c.out or c.sock is None:
                continue
            s = c.idx
            limit = min(acks[p * n_senders + s] for p in range(procs)) + self.window
            if rate:
                limit = min(limit, int(rate * (now - self.t_start) / 1e9) + 1)
            count = min(limit - c.seq, MAX_BATCH)
            if count > 0:
                self.write(c, self.msg.batch(c.seq, count, now))
                c.seq += count
                self.sent += count

    def all_slow_closed(self):
        procs = self.cfg["procs"]
        closed = sum(self.board[p * BOARD_SLOTS + SLOW_CLOSED] for p in range(procs))
        return closed >= len(self.cfg["slow_set"])

    def phase_run(self, t_start, t_end):
        def begin():
            self.t_start, self.lines0 = self.now, self.lines_in

        self.run_window(t_start, t_end, begin,
                        self.all_slow_closed if self.slow_names else lambda: False)
        self.resume_cut(force=True)
        return {"sent": {c.name: c.seq for c in self.senders},
                "window_lines": self.lines_in - self.lines0, "t_stop": self.now}

    def phase_finish(self, expect, deadline):
        expect = {**expect, **dict.fromkeys(self.slow_names, 0)}

        def drained():
            return all(c.sock is None for c in self.slow) and all(
                c.nxt.get(name, BIG) >= count for c in self.checkers if c.sock is not None
                for name, count in expect.items() if name in self.sender_names) and all(
                c.got >= self.due(c, expect) * self.line_len for c in self.readers
                if c.counting and c.sock is not None)

        complete = self.pump_until(deadline, drained)
        self.judge(expect)
        return self.report({"lat": self.lat.tobytes(), "complete": complete})

    def due(self, c, expect):
        """How many MSG lines a counting receiver ``c`` is owed in all."""
        return sum(count for name, count in expect.items()
                   if name in self.sender_names and name != c.name)

    def judge(self, expect):
        """Whatever did not arrive by the end: lost MSGs, missing INFOs, uncut slow clients."""
        for c in self.readers:
            if c.sock is None:
                continue
            if c.counting:
                due, got = self.due(c, expect), c.got // self.line_len
                if c.got % self.line_len:
                    self.fail("unexpected-line", b"%s got %d bytes: not whole MSG lines"
                              % (c.name, c.got))
                elif got < due:
                    self.fail("lost", b"%s got %d MSG lines of %d" % (c.name, got, due),
                              due - got)
                elif got > due:
                    self.fail("duplicate-or-reordered", b"%s got %d MSG lines, %d were sent"
                              % (c.name, got, due))
                continue
            for name, count in expect.items():
                if name in self.slow_names:
                    if c.infos[name] != 1:
                        self.fail("info-count", b"%s got %d INFO for %s"
                                  % (c.name, c.infos[name], name))
                elif name != c.name and c.nxt[name] < count:
                    self.fail("lost", b"%s: %s seq %d..%d never came"
                              % (c.name, name, c.nxt[name], count - 1), count - c.nxt[name])
        for c in self.slow:
            if c.sock is not None:
                self.fail("slow-client-not-cut", c.name)


class Dm(Load):
    """Pairs bounce one DM back and forth; the first of each pair times it."""

    FMT = b"DM %s %d %d\n"

    def __init__(self, *args):
        super().__init__(*args)
        self.round_trips = 0
        self.rtt = array.array("q")

    def make_clients(self):
        cfg, prefix, clients = self.cfg, self.cfg["prefix"], []
        for k in range(self.proc, cfg["pairs"], cfg["procs"]):
            a, b = Client(2 * k, b"%sa%d" % (prefix, k)), Client(2 * k + 1, b"%sb%d" % (prefix, k))
            a.peer, b.peer = b, a
            a.observer = True       # the timing side
            clients += [a, b]
        self.timers = clients[::2]
        return clients

    def on_lines(self, c, lines):
        peer = c.peer
        for line in lines:
            parts = line.split(b" ")
            if len(parts) != 4 or parts[0] != b"DM" or parts[1] != peer.name:
                self.fail("misrouted-or-bad-line", b"%s got %r" % (c.name, line[:100]))
                continue
            seq, stamp = int(parts[2]), int(parts[3])
            if seq != c.got:
                self.fail("duplicate-or-reordered", b"%s: seq %d, expected %d"
                          % (c.name, seq, c.got))
            c.got = seq + 1
            if not c.observer:
                self.write(c, self.FMT % (peer.name, seq, stamp))
                self.sent += 1
                continue
            self.round_trips += 1
            self.rtt.append(self.now - stamp)
            if self.running:
                self.serve_ball(c)

    def serve_ball(self, c):
        self.write(c, self.FMT % (c.peer.name, c.seq, self.now))
        c.seq += 1
        self.sent += 1

    def phase_run(self, t_start, t_end):
        self.run_window(t_start, t_end, lambda: [self.serve_ball(a) for a in self.timers])
        return {"round_trips": self.round_trips, "t_stop": self.now}

    def phase_finish(self, expect, deadline):
        return self.finish_round_trips(self.timers, deadline, b"DMs")


class Connect(Load):
    """Log in many idle clients; during the hold, nothing may arrive. With
    ``--password`` each logs in with it (its name registered beforehand:
    :func:`accounts_to_register`)."""

    @staticmethod
    def client_name(prefix, i):
        return b"%sc%d" % (prefix, i)

    def make_clients(self):
        cfg = self.cfg
        return [Client(i, self.client_name(cfg["prefix"], i))
                for i in range(self.proc, cfg["clients"], cfg["procs"])]

    def start_session(self, c):
        if self.cfg["password"] is None:
            super().start_session(c)
        else:
            self.write(c, b"LOGIN %s %s\n" % (c.name, self.cfg["password"].encode()))

    def on_lines(self, c, lines):
        for line in lines:
            self.unexpected(c, line)

    def phase_run(self, t_start, t_end):
        self.pump_until(t_end, timeout=0.05)
        return {"alive": self.connected}

    def phase_finish(self, expect, deadline):
        for c in self.clients:
            c.state = LEAVING
        return self.report({})


class Ping(Load):
    """Every client keeps one PING in flight; each PONG sends the next."""

    def __init__(self, *args):
        super().__init__(*args)
        self.pongs = 0
        self.rtt = array.array("q")

    def make_clients(self):
        cfg = self.cfg
        return [Client(i, b"%sp%d" % (cfg["prefix"], i))
                for i in range(self.proc, cfg["clients"], cfg["procs"])]

    def ping(self, c):
        c.t0 = self.now                 # from now on: when its PING went
        c.seq += 1
        self.sent += 1
        self.write(c, b"PING\n")

    def on_lines(self, c, lines):
        for line in lines:
            if line != b"PONG":
                self.unexpected(c, line)
                continue
            c.got += 1
            if c.got > c.seq:
                self.fail("duplicate-or-reordered", b"%s: PONG %d for %d PINGs"
                          % (c.name, c.got, c.seq))
            self.rtt.append(self.now - c.t0)
            if self.running:
                self.pongs += 1
                self.ping(c)

    def phase_run(self, t_start, t_end):
        self.run_window(t_start, t_end, lambda: [self.ping(c) for c in self.clients
                                                 if c.sock is not None])
        return {"pongs": self.pongs, "t_stop": self.now}

    def phase_finish(self, expect, deadline):
        return self.finish_round_trips(self.clients, deadline, b"PINGs")


class ShortLived(Load):
    """``--clients`` connections at a time, each opened in the run and
    closed once its exchange is over, then replaced by the next. Nobody
    logs in and nothing is set up: a subclass says how an exchange starts
    and judges it, calling :meth:`end`. The run reply counts the exchanges
    done in the run window under ``EVENT``; each is timed from its connect."""

    EVENT = TAG = None          # the run reply's count; the clients' name tag

    def __init__(self, *args):
        super().__init__(*args)
        self.done = 0
        self.lives = 0
        self.rtt = array.array("q")

    def make_clients(self):
        return []                       # no set-up: each comes and goes in the run

    def new_connection(self, slot):
        self.lives += 1
        c = Client(slot, b"%s%s%d.%d" % (self.cfg["prefix"], self.TAG, slot, self.lives))
        if self.open(c):
            self.clients.append(c)

    def end(self, c, ok):
        """``c``'s exchange is over (counted and timed if ``ok`` and in the
        run window): close it and start the next in its slot."""
        if ok and self.running:
            self.done += 1
            self.rtt.append(self.now - c.t0)
        self.close(c)
        self.clients.remove(c)
        if self.running:
            self.new_connection(c.idx)

    def phase_run(self, t_start, t_end):
        slots = range(self.proc, self.cfg["clients"], self.cfg["procs"])
        self.run_window(t_start, t_end, lambda: [self.new_connection(k) for k in slots])
        return {self.EVENT: self.done, "t_stop": self.now}

    def phase_finish(self, expect, deadline):
        complete = self.pump_until(deadline, lambda: not self.clients)
        for c in list(self.clients):
            self.fail("lost", b"%s: its exchange unfinished at the end" % c.name)
            self.close(c)
        return self.report({"rtt": self.rtt.tobytes(), "complete": complete})


class Handshake(ShortLived):
    """TLS only: each connection is a TCP connect, a handshake, a PING
    answered, and a close. The PONG proves the server finished its side of
    the handshake."""

    EVENT, TAG = "handshakes", b"h"

    def start_session(self, c):
        self.write(c, b"PING\n")

    def on_eof(self, c):
        self.fail("lost-connection", c.name)
        self.end(c, False)

    def logged_in(self, c, answer):
        """The first line: the PONG that ends one handshake's life."""
        if answer != b"PONG":
            self.unexpected(c, answer)
        self.end(c, answer == b"PONG")
        return False


class Refused(ShortLived):
    """Each connection, from an address the server bans, must get exactly
    ``--expect-line`` (``ERR banned``) and then EOF, within ``--timeout``
    of its connect. It sends nothing: the refusal is measured alone, and the
    acceptor's close never meets unread input (which would be a reset)."""

    EVENT, TAG = "refusals", b"x"

    def __init__(self, *args):
        super().__init__(*args)
        self.refusal = self.cfg["expect_line"].encode() + b"\n"
        self.timeout_ns = int(self.cfg["timeout"] * 1e9)

    def start_session(self, c):
        """Connected: wait for the refusal."""

    def received(self, c, data):
        c.carry += data
        if not self.refusal.startswith(c.carry):
            self.fail("unexpected-line", b"%s got %r" % (c.name, c.carry[:100]))
            self.end(c, False)

    def on_eof(self, c):
        if c.carry != self.refusal:
            self.fail("unexpected-line" if c.carry else "closed-without-a-line",
                      b"%s got %r, then EOF" % (c.name, c.carry[:100]))
        self.end(c, c.carry == self.refusal)

    def tick(self):
        """Connections still open ``--timeout`` after their connect were
        not refused (one whose connect failed, counted then, is replaced
        now). ``clients`` is in order of connect: the oldest first."""
        while self.clients and self.now - self.clients[0].t0 > self.timeout_ns:
            c = self.clients[0]
            if c.sock is not None:
                self.fail("not-refused", b"%s: no EOF %.1f s after its connect (got %r)"
                          % (c.name, self.cfg["timeout"], c.carry[:100]))
            self.end(c, False)


class Churn(Load):
    """Clients keep arriving, chatting and leaving; observers stay throughout.

    A life logs in under a fresh name, sends ``--msgs`` MSGs and leaves by
    QUIT, by half-closing, or (sending nothing, so nothing can be lost) by
    closing at once. Every observer must then see each of its MSGs once, in
    order, and exactly one INFO after the last; a churner, logged in for part
    of a life, may see a part of it but no gap, duplicate or second INFO.
    """

    def __init__(self, *args):
        self.msg = MessageCheck(args[0]["size"], 1 << 40)
        super().__init__(*args)
        self.lives = {}
        self.generation = 0

    def make_clients(self):
        cfg = self.cfg
        observers = []
        for i in range(self.proc, cfg["observers"], cfg["procs"]):
            c = Client(i, b"%so%d" % (cfg["prefix"], i))
            c.observer = True
            observers.append(c)
        self.observers = observers
        self.slots = list(range(cfg["observers"] + self.proc, cfg["observers"] + cfg["clients"],
                                cfg["procs"]))
        self.churners = []
        return list(observers)

    def new_life(self, idx):
        """A fresh client in slot ``idx``, under a name never used before."""
        self.generation += 1
        c = Client(idx, b"%sl%d.%d" % (self.cfg["prefix"], idx, self.generation))
        c.kind = self.generation % 3
        if self.open(c):
            self.churners.append(c)

    def on_login(self, c):
        if c.observer:
            return
        if c.kind == 0:
            c.state = LEAVING
            self.lives[c.name] = 0
            self.close(c)
            self.replace(c)
            return
        count = self.cfg["msgs"]
        self.lives[c.name] = count
        self.write(c, self.msg.batch(0, count, 0) + (b"QUIT\n" if c.kind == 1 else b""))
        self.sent += count
        c.state = LEAVING
        if c.kind == 2 and c.sock is not None:
            self.half_close(c)

    def on_eof(self, c):
        leaving = c.state == LEAVING
        super().on_eof(c)
        if leaving and not c.observer:
            self.replace(c)

    def replace(self, c):
        self.churners.remove(c)
        if self.running:
            self.new_life(c.idx)

    def on_lines(self, c, lines):
        parse, seen = self.msg.parse, c.nxt
        for line in lines:
            m = parse(line)
            if m is not None:
                sender, seq, _ = m
                entry = seen.get(sender)
                if entry is None:
                    entry = seen[sender] = [0 if c.observer else seq, 0, -1]
                if entry[1]:
                    self.fail("msg-after-info", b"%s: %r" % (c.name, line[:80]))
                if seq == entry[0]:
                    entry[0] = seq + 1
                else:
                    self.fail("lost" if seq > entry[0] else "duplicate-or-reordered",
                              b"%s: %s seq %d, expected %d" % (c.name, sender, seq, entry[0]))
                    entry[0] = max(entry[0], seq + 1)
                continue
            parts = line.split(b" ")
            if len(parts) == 3 and parts[0] == b"INFO" and parts[2] == b"disconnected":
                entry = seen.setdefault(parts[1], [0, 0, -1])
                entry[1] += 1
                entry[2] = entry[0]
                if entry[1] > 1:
                    self.fail("duplicate-info", b"%s: %r" % (c.name, line))
            else:
                self.unexpected(c, line)

    def phase_run(self, t_start, t_end):
        self.run_window(t_start, t_end, lambda: [self.new_life(idx) for idx in self.slots])
        deadline = self.now + int(self.cfg["drain_timeout"] * 1e9)
        if not self.pump_until(deadline, lambda: all(c.sock is None for c in self.churners)):
            still_open = sum(c.sock is not None for c in self.churners)
            self.fail("leaver-not-closed", "%d clients still open" % still_open)
        return {"lives": self.lives, "t_stop": self.now}

    def phase_finish(self, expect, deadline):
        def drained():
            return all(o.nxt.get(name, (-1, 0))[1] == 1 for o in self.observers
                       if o.sock is not None for name in expect)

        complete = self.pump_until(deadline, drained)
        for o in self.observers:
            if o.sock is not None:
                self.judge(o, expect)
        return self.report({"complete": complete})

    def judge(self, o, expect):
        """An observer saw every life whole: all MSGs, then exactly one INFO."""
        for name, count in expect.items():
            got, infos, at_info = o.nxt.get(name, (0, 0, -1))
            if infos != 1:
                self.fail("info-count", b"%s got %d INFO for %s" % (o.name, infos, name))
            if got < count:
                self.fail("lost", b"%s: %s seq %d..%d never came" % (o.name, name, got, count - 1),
                          count - got)
            elif infos and at_info != count:
                self.fail("info-before-last-msg", b"%s: INFO %s after %d of %d MSGs"
                          % (o.name, name, at_info, count))
        for name in o.nxt.keys() - expect.keys():
            if name.startswith(self.cfg["prefix"]) and name not in {x.name for x in self.observers}:
                self.fail("unknown-user", b"%s heard of %s" % (o.name, name))


class Upgrade(Broadcast):
    """upgrade: fanout at a steady rate while the server upgrades itself
    under it (:class:`Upgrades` runs ``ctl upgrade``); nobody may notice.

    Fanout's oracle judges every line, so a line lost, doubled, reordered
    or cut by a switch fails as ever; so do an INFO line and a close by the
    server. Beside that: at each upgrade, every other sender writes the
    first part of its next line just before the command starts and the
    rest once it has returned, and that line must arrive whole, in its
    place; newcomers (``--arrivals`` a second) connect, log in and stay,
    each checking every sender's lines from the first it gets on. With
    ``--tls-share`` some clients (:func:`speaks_tls`) go to the TLS port.

    The coordinator's word comes through the board: UPGRADE_STARTING k
    (write the first parts, then say HALVES_SENT k), UPGRADE_DONE k (write
    the rest), RUN_OVER.
    """

    def __init__(self, *args):
        super().__init__(*args)
        self.known_senders = frozenset(self.sender_names)
        self.newcomers = set()
        self.arrived = 0
        self.rests = {}             # sender -> the rest of the line it has begun
        self.split = []             # (sender's name, seq) of each line written in two

    def target(self, c):
        if speaks_tls(self.cfg, c.idx):
            return self.cfg["tls_target"]
        return super().target(c)

    def tick(self):
        board, i = self.board, self.slot
        if self.rests and board[i + UPGRADE_DONE] >= board[i + HALVES_SENT]:
            self.write_rests()
        if board[i + UPGRADE_STARTING] > board[i + HALVES_SENT]:
            self.write_halves(board[i + UPGRADE_STARTING])
        if self.running:
            self.let_newcomers_in()
        super().tick()

    def write_halves(self, k):
        """Upgrade ``k`` is about to start: every other sender writes the
        first part of its next line, cut at a point that varies, and is
        out of ``senders`` (nothing may come between the parts) until
        :meth:`write_rests`."""
        for c in [c for c in self.senders if (c.idx + k) % 2 == 0 and c.sock is not None]:
            line = self.msg.batch(c.seq, 1, 0)
            cut = 1 + (c.idx * 7 + k * 13) % (len(line) - 1)
            self.write(c, line[:cut])
            self.rests[c] = line[cut:]
            self.split.append((c.name, c.seq))
            self.senders.remove(c)
            c.seq += 1
            self.sent += 1
        self.board[self.slot + HALVES_SENT] = k

    def write_rests(self):
        for c, rest in self.rests.items():
            self.write(c, rest)
            self.senders.append(c)
        self.rests.clear()

    def let_newcomers_in(self):
        """This process's share of ``--arrivals`` a second, each process's
        arrivals between the others'."""
        cfg = self.cfg
        due = int((cfg["arrivals"] * (self.now - self.t_start) / 1e9 + self.proc) / cfg["procs"])
        while self.arrived < due:
            idx = cfg["clients"] + self.arrived * cfg["procs"] + self.proc
            self.arrived += 1
            c = Client(idx, b"%sn%d" % (cfg["prefix"], idx))
            if self.open(c):
                self.clients.append(c)
                self.newcomers.add(c)

    def on_lines(self, c, lines):
        if c in self.newcomers and len(c.nxt) < len(self.sender_names):
            for line in lines:      # each sender's lines from the first it gets on
                m = self.msg.parse(line)
                if m is not None and m[0] in self.known_senders:
                    c.nxt.setdefault(m[0], m[1])
        super().on_lines(c, lines)

    def about(self, c):
        """Its name, how and when it came, whether it had logged in: what
        tells whether an upgrade was under way."""
        return b"%s (%s, %s, %s)" % (
            c.name, b"TLS" if speaks_tls(self.cfg, c.idx) else b"plaintext",
            b"connected %.2f s into the run" % ((c.t0 - self.t_start) / 1e9)
            if c in self.newcomers else b"logged in at set-up",
            b"before its OK" if c.state in (CONNECTING, LOGGING_IN) else b"logged in")

    def other_line(self, c, line):
        if line.startswith(b"INFO "):   # nobody leaves: an upgrade made it up
            self.fail("info-line", b"%s got %r" % (c.name, line[:100]))
        else:
            super().other_line(c, line)

    def run_window(self, t_start, t_end, begin, done=lambda: False):
        """The run ends when the coordinator says (RUN_OVER)."""
        super().run_window(t_start, t_end, begin, lambda: self.board[self.slot + RUN_OVER] > 0)
        self.write_rests()              # had it ended between two parts

    def phase_run(self, t_start, t_end):
        reply = super().phase_run(t_start, t_end)
        reply["split"] = self.split
        return reply

    def phase_finish(self, expect, deadline):
        def caught_up():
            return all(c.state == READY and all(c.nxt.get(name, count) >= count
                                                for name, count in expect.items())
                       for c in self.newcomers if c.sock is not None)

        self.pump_until(deadline, caught_up)
        reply = super().phase_finish(expect, deadline)
        open_checkers = [c for c in self.checkers if c.sock is not None]
        reply.update(lat_sent=self.lat_sent.tobytes(),
                     newcomers=sum(c.state == READY for c in self.newcomers),
                     reached={name: min([c.nxt[name] for c in open_checkers], default=BIG)
                              for name in self.sender_names})
        return reply

    def judge(self, expect):
        super().judge(expect)
        for c in self.newcomers:
            if c.sock is None:
                continue
            if c.state != READY:
                self.fail("login-unanswered", self.about(c))
                continue
            for name, count in expect.items():
                got = c.nxt.get(name, count)
                if got < count:
                    self.fail("lost", b"%s: %s seq %d..%d never came"
                              % (c.name, name, got, count - 1), count - got)


class UnderAttack:
    """Mixed in before a scenario's class with ``--attack N`` (dm, ping): N
    more connections, opened as the run begins, each guessing the password
    of a registered name (:meth:`victim_name`) as fast as its answers come,
    one guess in flight, until the run ends; then they close. An answer must
    be ``ERR bad-password`` or ``ERR too-many-attempts`` (counted in the run
    window): ``OK``, or anything else, is a failure. The scenario's own
    clients, their addresses and their figures are those of a run without,
    so that the two compare directly; the guessers' addresses come after."""

    VICTIMS = 5
    WRONG_PASSWORD = b"wrongpassword"
    ANSWERS = {b"ERR bad-password": "guesses_bad_password",
               b"ERR too-many-attempts": "guesses_too_many_attempts"}

    @staticmethod
    def victim_name(prefix, k):
        return b"%svictim%d" % (prefix, k)

    def __init__(self, *args):
        super().__init__(*args)
        cfg = self.cfg
        self.guesses = [b"LOGIN %s %s\n" % (self.victim_name(cfg["prefix"], k),
                                            self.WRONG_PASSWORD) for k in range(self.VICTIMS)]
        self.guessers = [Client(cfg["first_guesser"] + k, b"%sg%d" % (cfg["prefix"], k))
                         for k in range(self.proc, cfg["attack"], cfg["procs"])]
        self.answers = Counter()

    def run_window(self, t_start, t_end, begin, done=lambda: False):
        def begin_attack():
            for c in self.guessers:
                self.open(c)
            begin()

        super().run_window(t_start, t_end, begin_attack, done)
        for c in self.guessers:
            self.close(c)

    def phase_run(self, t_start, t_end):
        reply = super().phase_run(t_start, t_end)
        reply["guesses"] = dict(self.answers)
        return reply

    def start_session(self, c):
        if c.idx < self.cfg["first_guesser"]:
            super().start_session(c)
            return
        self.logins_pending -= 1        # it never logs in
        c.state = GUESSING
        self.write(c, self.guess_of(c))

    def guess_of(self, c):
        """The line guesser ``c`` sends, again and again."""
        return self.guesses[c.idx % self.VICTIMS]

    def received(self, c, data):
        if c.state != GUESSING:
            super().received(c, data)
            return
        lines = (c.carry + data).split(b"\n")
        c.carry = lines.pop()
        for line in lines:
            answer = self.ANSWERS.get(line)
            if answer is None:
                self.fail("guess-accepted" if line == b"OK" else "unexpected-line",
                          b"%s got %r to %r" % (c.name, line[:100], self.guess_of(c).strip()))
                self.close(c)
                return
            if self.running:
                self.answers[answer] += 1
        if lines and self.running:
            self.write(c, self.guess_of(c))


LOADS = {"fanout": Broadcast, "slow": Broadcast, "dm": Dm, "connect": Connect, "churn": Churn,
         "ping": Ping, "handshake": Handshake, "refused": Refused, "upgrade": Upgrade}


class OverTls:
    """Mixed in before a scenario's class with ``--tls``: its clients speak
    TLS, and the scenario sees the same plaintext as ever. (With upgrade's
    ``--tls-share`` only some do, :func:`speaks_tls`: the others, whose
    ``c.tls`` is None, go by the plaintext methods.)

    One :class:`TlsClient` per connection over the same non-blocking
    socket: the ClientHello goes once TCP is connected, LOGIN (and anything
    written meanwhile) waits in it for the handshake, each read is decrypted
    whole (OpenSSL is read dry: epoll cannot see what it holds), the
    server's close_notify is the end of the stream, a half-close is the
    client's close_notify. ``c.out`` holds ciphertext, so a sender still
    waits while its socket is full.
    """

    def __init__(self, *args):
        self.tls_context = client_context()
        super().__init__(*args)

    def open(self, c):
        if not super().open(c):
            return False
        if speaks_tls(self.cfg, c.idx):
            c.tls = TlsClient(self.tls_context)
        return True

    def start_session(self, c):
        if c.tls is not None:
            self.send_raw(c, c.tls.start())
        super().start_session(c)

    def write(self, c, data):
        if c.tls is None:               # plaintext, or closed
            super().write(c, data)
            return
        try:
            data = c.tls.encrypt(data)
        except ssl.SSLError as exc:
            self.tls_failed(c, exc)
            return
        if data:
            self.send_raw(c, data)

    def half_close(self, c):
        if c.tls is None:
            super().half_close(c)
        else:
            self.send_raw(c, c.tls.close_write())

    def received(self, c, data):
        tls = c.tls
        if tls is None:
            super().received(c, data)
            return
        try:
            data, reply = tls.decrypt(data)
        except ssl.SSLError as exc:
            self.tls_failed(c, exc)
            return
        if reply:
            self.send_raw(c, reply)
        if data and c.sock is not None:
            super().received(c, data)
        if tls.closed and c.sock is not None:
            self.on_eof(c)

    def tls_failed(self, c, exc):
        self.fail("tls-failed", "%s: %s" % (c.name.decode(), exc))
        self.on_eof(c)

    def close(self, c):
        super().close(c)
        c.tls = None


def speaks_tls(cfg, idx):
    """Whether client ``idx`` speaks TLS: every one with ``--tls``; with
    upgrade's ``--tls-share``, that share of them, spread evenly."""
    share = 1 if cfg["tls"] else cfg.get("tls_share", 0)
    return int((idx + 1) * share) > int(idx * share)


def load_class(cfg):
    """The scenario's class, under attack with ``--attack``, over TLS with
    ``--tls`` (or ``--tls-share``)."""
    cls = LOADS[cfg["scenario"]]
    if cfg.get("attack"):
        cls = type("Attacked" + cls.__name__, (UnderAttack, cls), {})
    if cfg.get("tls") or cfg.get("tls_share"):
        cls = type("Tls" + cls.__name__, (OverTls, cls), {})
    return cls


def load_main(cfg, proc, pipe, board, acks, flags):
    """Entry point of a stress process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # the coordinator decides
    raise_nofile_limit()
    cls = load_class(cfg)
    load = cls(cfg, proc, pipe, board, acks, flags) if issubclass(cls, Broadcast) else \
        cls(cfg, proc, pipe, board)
    load.serve()
    pipe.send(own_cpu())


# -- the coordinator ---------------------------------------------------------------

class StressError(Exception):
    """The run could not go on (server did not start, a stress process died...)."""


class Fleet:
    """The stress processes, driven phase by phase, and the memory they share."""

    def __init__(self, cfg, on_wait):
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
        n = cfg["procs"]
        self.board = ctx.Array("q", n * BOARD_SLOTS, lock=False)
        acks = ctx.Array("q", n * max(1, cfg.get("senders", 1)), lock=False)
        flags = ctx.Array("b", max(1, cfg.get("clients", 1)), lock=False)
        self.on_wait = on_wait
        self.pipes, self.procs = [], []
        for p in range(n):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=load_main, name="stress-%d" % p, daemon=True,
                               args=(cfg, p, theirs, self.board, acks, flags))
            proc.start()
            theirs.close()
            self.pipes.append(mine)
            self.procs.append(proc)

    def total(self, slot):
        return sum(self.board[p * BOARD_SLOTS + slot] for p in range(len(self.procs)))

    def lowest(self, slot):
        return min(self.board[p * BOARD_SLOTS + slot] for p in range(len(self.procs)))

    def tell(self, slot, value):
        """Put ``value`` in ``slot`` of every process: they read it each loop turn."""
        for p in range(len(self.procs)):
            self.board[p * BOARD_SLOTS + slot] = value

    def command(self, *cmd, timeout):
        """Send a phase command to every process; their replies, in order."""
        for pipe in self.pipes:
            pipe.send(cmd)
        replies = [None] * len(self.pipes)
        waiting = {pipe: i for i, pipe in enumerate(self.pipes)}
        sentinels = {proc.sentinel: proc for proc in self.procs}
        deadline = time.monotonic() + timeout
        while waiting:
            for ready in multiprocessing.connection.wait(list(waiting) + list(sentinels), 0.25):
                if ready in sentinels:
                    if ready not in waiting:
                        raise StressError("%s died (exit %s) during %s"
                                          % (sentinels[ready].name, sentinels[ready].exitcode, cmd[0]))
                    continue
                replies[waiting.pop(ready)] = ready.recv()
            self.on_wait()
            if time.monotonic() > deadline:
                raise StressError("stress processes did not finish %s in %.0f s" % (cmd[0], timeout))
        return replies

    def stop(self):
        """Tell every process to exit; the CPU seconds they used, summed."""
        cpu = 0.0
        for pipe, proc in zip(self.pipes, self.procs):
            try:
                pipe.send(("exit",))
                if pipe.poll(10):
                    cpu += pipe.recv()
            except (OSError, EOFError):
                pass
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        return cpu


class Monitor:
    """Live progress on stderr once a second, and the server's peak RSS."""

    def __init__(self, server_pids, live):
        self.server_pids = server_pids
        self.live = live
        self.fleet = None
        self.t0 = time.monotonic()
        self.next_line = self.t0 + 1
        self.next_sample = 0
        self.last = (self.t0, 0, 0)
        self.peak_rss = 0

    def usage(self):
        """(CPU s, RSS bytes) of the server now, or None without a pid."""
        got = usage(self.server_pids)
        if got:
            self.peak_rss = max(self.peak_rss, got[1])
        return got

    def __call__(self):
        now = time.monotonic()
        if now >= self.next_sample:
            self.next_sample = now + 0.2
            self.usage()
        if self.live and now >= self.next_line and self.fleet is not None:
            self.next_line = now + 1
            sent, received = self.fleet.total(SENT), self.fleet.total(RECEIVED)
            t, s0, r0 = self.last
            self.last = (now, sent, received)
            sys.stderr.write("\r%6.1fs  connected %6d  msgs/s %9.0f  deliveries/s %10.0f "
                             % (now - self.t0, self.fleet.total(CONNECTED),
                                (sent - s0) / (now - t), (received - r0) / (now - t)))
            sys.stderr.flush()

    def end_line(self):
        if self.live and self.next_line > self.t0 + 1:
            sys.stderr.write("\n")


# One ``ctl upgrade``: when it started and ended (monotonic ns), ctl's exit
# status (None: no answer in time) and what it said (its line, or its ERR).
UpgradeRun = namedtuple("UpgradeRun", "started ended status answer")

# The server's processes at one moment: {pid: (start time, title)}; their
# open descriptors and RSS (bytes), summed; the tool's clients logged in.
ServerTree = namedtuple("ServerTree", "processes descriptors rss connected")


def upgrade(broker, control, options):
    """``broker.py ctl upgrade OPTIONS`` to the server whose control socket
    is ``control``, as an operator runs it, timed: an :data:`UpgradeRun`."""
    command = [sys.executable, broker, "ctl", "--control", control,
               "--timeout", str(UPGRADE_TIMEOUT), "upgrade"] + options
    started = time.monotonic_ns()
    try:
        proc = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=UPGRADE_TIMEOUT + 10)
    except subprocess.TimeoutExpired:
        return UpgradeRun(started, time.monotonic_ns(), None,
                          "no answer in %.0f s" % (UPGRADE_TIMEOUT + 10))
    answer = (proc.stdout + proc.stderr).decode("utf-8", "replace").strip()
    return UpgradeRun(started, time.monotonic_ns(), proc.returncode, answer)


def server_tree(root, connected):
    """A :data:`ServerTree` of the server whose main process is ``root``."""
    processes, descriptors = {}, 0
    for pid in process_tree(root):
        fields = stat(pid)
        if fields is None:
            continue                    # gone meanwhile
        processes[pid] = (fields[STARTTIME], process_role(pid))
        try:
            descriptors += len(os.listdir("/proc/%d/fd" % pid))
        except OSError:
            pass
    return ServerTree(processes, descriptors, usage([root])[1], connected)


def tls_relays(pids, tls_port):
    """Those of ``pids`` that hold a connection accepted on ``tls_port``:
    old workers kept on as the relays of TLS sessions."""
    accepted = {inode for local, _, state, inode in tcp_sockets()
                if local == tls_port and state != "0A"}         # 0A: listening
    return [pid for pid in pids if socket_inodes(pid) & accepted]


class Upgrades(threading.Thread):
    """The coordinator's side of the upgrade scenario, beside the run phase.

    ``--every`` s after the run begins, and after each upgrade, it tells
    the stress processes to write their first halves, waits until they
    have (HALVES_TIMEOUT at most), runs :func:`upgrade` and tells them to
    write the rest; ``--every`` s after the last, the run is over. It looks
    at the server's processes before each upgrade and at the end: whatever
    was there before an upgrade that succeeded and is still there at the
    end is an old process left.
    """

    def __init__(self, args, fleet, t_start):
        super().__init__(name="upgrades", daemon=True)
        self.args = args
        self.fleet = fleet
        self.t_start = t_start          # monotonic ns
        self.stopping = threading.Event()
        self.runs = []                  # an UpgradeRun each
        self.trees = []                 # a ServerTree before each upgrade, and at the end

    def run(self):
        args, fleet = self.args, self.fleet
        next_at = self.t_start / 1e9 + args.every
        try:
            for k in range(1, args.upgrades + 1):
                if self.stopping.wait(max(0.0, next_at - time.monotonic())):
                    return
                self.trees.append(self.look())
                fleet.tell(UPGRADE_STARTING, k)
                deadline = time.monotonic() + HALVES_TIMEOUT
                while fleet.lowest(HALVES_SENT) < k and time.monotonic() < deadline:
                    time.sleep(0.001)
                self.runs.append(upgrade(args.broker, args.control, args.upgrade_args))
                fleet.tell(UPGRADE_DONE, k)
                next_at = time.monotonic() + args.every
            if not self.stopping.wait(max(0.0, next_at - time.monotonic())):
                self.trees.append(self.look())
        finally:
            fleet.tell(RUN_OVER, 1)

    def look(self):
        return server_tree(self.args.server_pid[0], self.fleet.total(CONNECTED))

    def stop(self):
        """End it early (the run failed), or wait for its end."""
        self.stopping.set()
        self.join(UPGRADE_TIMEOUT + 20)

    def report(self, runs, fins, failures, examples):
        """The upgrades' figures; what they broke added to ``failures``."""
        def failed(kind, text, count=1):
            failures[kind] += count
            examples.setdefault(kind, [])
            if len(examples[kind]) < SAMPLES_PER_KIND:
                examples[kind].append(text)

        said = [UPGRADE_SAID.search(r.answer) for r in self.runs]
        figures = {"tls_clients": sum(speaks_tls(vars(self.args), i)
                                      for i in range(self.args.clients)),
                   "newcomers": sum(f["newcomers"] for f in fins),
                   "upgrades_done": sum(r.status == 0 for r in self.runs),
                   "upgrade_at_s": [round((r.started - self.t_start) / 1e9, 2) for r in self.runs],
                   "upgrade_command_s": [round((r.ended - r.started) / 1e9, 3) for r in self.runs],
                   "upgrade_said_s": [float(m.group(1)) if m else None for m in said],
                   "upgrade_moved": [int(m.group(2)) if m else None for m in said]}
        for k, r in enumerate(self.runs, 1):
            if r.status != 0:
                failed("upgrade-failed", "upgrade %d: exit %s: %s" % (k, r.status, r.answer))
        figures.update(self.partial_lines(runs, fins, failed))
        figures.update(closed_by_server=failures["lost-connection"],
                       info_lines=failures["info-line"], lines_lost=failures["lost"],
                       lines_doubled_or_reordered=failures["duplicate-or-reordered"],
                       lines_cut_or_foreign=failures["unexpected-line"])
        figures.update(self.latencies(fins))
        if self.trees:
            figures.update(self.processes(failed))
        return figures

    def partial_lines(self, runs, fins, failed):
        """The lines written in two, and how many of them every checking
        receiver got past in order: whole, in their place (one lost
        outright is past too, and counted under ``lost``)."""
        split = [line for r in runs for line in r["split"]]
        reached = {}
        for f in fins:
            for name, seq in f["reached"].items():
                reached[name] = min(reached.get(name, BIG), seq)
        finished = sum(seq < reached[name] for name, seq in split)
        if finished < len(split):
            failed("partial-line-unfinished", "%d of %d lines written in two never came whole"
                   % (len(split) - finished, len(split)), len(split) - finished)
        return {"partial_lines": len(split), "partial_lines_finished": finished}

    def latencies(self, fins):
        """The delays of lines sent while an upgrade was under way, and of the others."""
        starts = [r.started for r in self.runs]
        during, otherwise = array.array("q"), array.array("q")
        for f in fins:
            delays, sent = array.array("q"), array.array("q")
            delays.frombytes(f["lat"])
            sent.frombytes(f["lat_sent"])
            for delay, at in zip(delays, sent):
                k = bisect_right(starts, at) - 1
                (during if k >= 0 and at <= self.runs[k].ended else otherwise).append(delay)
        figures = latency_figures("latency_during_upgrade", [during.tobytes()])
        figures.update(latency_figures("latency_otherwise", [otherwise.tobytes()]))
        return figures

    def processes(self, failed):
        """The server before the first upgrade and at the end; old processes
        left. The upgrade replaces the processes that are titled ``chat-*``:
        the main process stays, and so does multiprocessing's resource
        tracker (a helper of ``spawn``, with which it starts the new ones)."""
        before, after = self.trees[0], self.trees[-1]
        old = {pid: start for tree, run in zip(self.trees, self.runs) if run.status == 0
               for pid, (start, title) in tree.processes.items() if title.startswith("chat-")}
        left = [pid for pid, (start, _) in after.processes.items() if old.get(pid) == start]
        relays = tls_relays(left, self.args.tls_target[1]) if self.args.tls_share else []
        stayed = ["%s (pid %d)" % (after.processes[pid][1], pid) for pid in left
                  if pid not in relays]
        for text in stayed:
            failed("old-process-left", text)
        return {"server_processes_before": len(before.processes),
                "server_processes_after": len(after.processes),
                "server_fds_before": before.descriptors, "server_fds_after": after.descriptors,
                "server_rss_before_mb": round(before.rss / 2 ** 20, 1),
                "server_rss_after_mb": round(after.rss / 2 ** 20, 1),
                "connected_before": before.connected, "connected_after": after.connected,
                "old_processes_relaying": len(relays), "old_processes_left": stayed}


def ms(ns):
    return None if ns is None else round(ns / 1e6, 3)


def latency_figures(prefix, blobs):
    """p50/p99/p999/max in ms of the samples (nanoseconds) the processes sent."""
    values = array.array("q")
    for blob in blobs:
        values.frombytes(blob)
    ordered = sorted(values)
    return {prefix + "_samples": len(ordered),
            prefix + "_p50_ms": ms(percentile(ordered, 0.50)),
            prefix + "_p99_ms": ms(percentile(ordered, 0.99)),
            prefix + "_p999_ms": ms(percentile(ordered, 0.999)),
            prefix + "_max_ms": ms(ordered[-1] if ordered else None)}


def login_figures(setups):
    """How fast the set-up logins went."""
    ok = sum(s["ok"] for s in setups)
    starts = [s["span"][0] for s in setups if s["ok"]]
    span = (max(s["span"][1] for s in setups) - min(starts)) / 1e9 if starts else 0
    figures = {"logged_in": ok, "logins_per_s": round(ok / span, 1) if span else None}
    figures.update(latency_figures("login", [s["login_ns"] for s in setups]))
    for key in ("login_p999_ms", "login_samples"):
        del figures[key]
    return figures


def merge_counts(dicts):
    total = {}
    for d in dicts:
        total.update(d)
    return total


def scenario_expectations(scenario, runs):
    """What the finish phase must see arrive, from what the run phase sent."""
    if scenario in ("fanout", "slow", "upgrade"):
        return merge_counts(r["sent"] for r in runs)
    if scenario == "churn":
        return merge_counts(r["lives"] for r in runs)
    return {}


# Scenarios whose run phase counts one kind of event, each timed: the
# run replies' count (also the figures' name) and the latency figures' prefix.
TIMED_EVENTS = {"dm": ("round_trips", "rtt"), "ping": ("pongs", "rtt"),
                "handshake": ("handshakes", "handshake"), "refused": ("refusals", "refusal")}


def scenario_figures(args, runs, fins, window):
    """The scenario's own figures from the run and finish replies."""
    lines = sum(f["lines"] for f in fins)
    if args.scenario in ("fanout", "slow", "upgrade"):
        sent = sum(sum(r["sent"].values()) for r in runs)
        drain = max(0, max(f["last_rx"] for f in fins) - max(r["t_stop"] for r in runs)) / 1e9
        window_lines = sum(r["window_lines"] for r in runs)
        figures = {"duration_s": round(window, 3), "msgs_sent": sent,
                   "msgs_per_s": round(sent / window, 1),
                   "deliveries_per_s": round(window_lines / window, 1),
                   "drain_s": round(drain, 3), "drain_complete": all(f["complete"] for f in fins)}
        figures.update(latency_figures("latency", [f["lat"] for f in fins]))
        return figures
    if args.scenario in TIMED_EVENTS:
        event, prefix = TIMED_EVENTS[args.scenario]
        count = sum(r[event] for r in runs)
        figures = {"duration_s": round(window, 3), event: count,
                   event + "_per_s": round(count / window, 1)}
        figures.update(latency_figures(prefix, [f["rtt"] for f in fins]))
        return figures
    if args.scenario == "churn":
        lives = sum(len(r["lives"]) for r in runs)
        return {"duration_s": round(window, 3), "lives": lives,
                "lives_per_s": round(lives / window, 1), "lines_received": lines,
                "drain_complete": all(f["complete"] for f in fins)}
    return {"alive_after_hold": sum(r["alive"] for r in runs)}


def drive(args, cfg, fleet, monitor, redis=None):
    """setup, run, finish: the figures and the failures of one scenario
    (and with the ``redis`` of a spawned cluster, what it did meanwhile)."""
    result = {}
    before = monitor.usage()
    setups = fleet.command("setup", timeout=args.setup_timeout + 30)
    result.update(login_figures(setups))
    after_setup = monitor.usage()
    if before and after_setup:
        result["server_cpu_setup_s"] = round(after_setup[0] - before[0], 2)
    if args.scenario == "connect":
        if before and after_setup and result["logged_in"]:     # the logins are the load
            result["server_cpu_us_per_login"] = round(
                (after_setup[0] - before[0]) / result["logged_in"] * 1e6, 1)
        time.sleep(args.settle)
        after = monitor.usage()
        if before and after:
            result["server_rss_before_mb"] = round(before[1] / 2 ** 20, 1)
            result["server_rss_after_mb"] = round(after[1] / 2 ** 20, 1)
            result["server_kb_per_client"] = round((after[1] - before[1]) / 1024
                                                   / max(1, result["logged_in"]), 2)
    duration = args.hold if args.scenario == "connect" else args.duration
    if args.scenario == "upgrade":      # over when the upgrades are: a bound
        duration += args.upgrades * (UPGRADE_TIMEOUT + HALVES_TIMEOUT + 10)
    t_cmd = time.monotonic_ns()
    t_start = t_cmd + 200_000_000
    t_end = t_start + int(duration * 1e9)
    at_start = monitor.usage()
    redis_start = redis.usage() if redis else None
    upgrades = Upgrades(args, fleet, t_start) if args.scenario == "upgrade" else None
    if upgrades:
        upgrades.start()
    try:
        runs = fleet.command("run", t_start, t_end, timeout=duration + args.drain_timeout + 30)
    finally:
        if upgrades:
            upgrades.stop()
    at_stop = monitor.usage()
    t_stop = max(r.get("t_stop", t_end) for r in runs)
    window = max(1e-3, (t_stop - t_start) / 1e9)
    result.update(tool_figures(setups, runs, (t_stop - t_cmd) / 1e9))
    expect = scenario_expectations(args.scenario, runs)
    deadline = time.monotonic_ns() + int(args.drain_timeout * 1e9)
    fins = fleet.command("finish", expect, deadline, timeout=args.drain_timeout + 30)
    result.update(scenario_figures(args, runs, fins, window))
    if cfg.get("attack"):
        result.update(attack_figures(cfg["attack"], runs, window))
    if redis_start:
        result.update(redis_figures(redis_start, redis.usage(),
                                    sum(f["lines_sent"] - r["lines_sent"]
                                        for f, r in zip(fins, setups))))
    if at_start and at_stop:
        result["server_cpu_s"] = round(at_stop[0] - at_start[0], 2)
        result["server_cpu_pct"] = round(100 * (at_stop[0] - at_start[0]) / window, 1)
        result.update(cpu_per_unit(result))
    if monitor.peak_rss:
        result["server_peak_rss_mb"] = round(monitor.peak_rss / 2 ** 20, 1)
    failures, examples = Counter(), {}
    for f in fins:
        failures.update(f["failures"])
        for kind, texts in f["examples"].items():
            examples.setdefault(kind, []).extend(texts[:SAMPLES_PER_KIND - len(examples.get(kind, []))])
    if upgrades:
        result.update(upgrades.report(runs, fins, failures, examples))
    return result, failures, examples


def attack_figures(attackers, runs, window):
    """--attack: the guesses answered in the run window, a second, and how."""
    answers = Counter()
    for r in runs:
        answers.update(r["guesses"])
    guesses = sum(answers.values())
    figures = {"attackers": attackers, "guesses": guesses,
               "guesses_per_s": round(guesses / window, 1)}
    figures.update((name, answers[name]) for name in UnderAttack.ANSWERS.values())
    return figures


def cpu_per_unit(result):
    """Server CPU per unit of the scenario's work: the figure that scales
    (the rate is bounded by the tool on the same cores, the cost is not)."""
    cpu = result["server_cpu_s"]
    duration = result.get("duration_s")
    units = [("deliveries_per_s", "server_cpu_us_per_delivery", 1e6),
             ("round_trips_per_s", "server_cpu_us_per_round_trip", 1e6),
             ("pongs_per_s", "server_cpu_us_per_pong", 1e6),
             ("handshakes_per_s", "server_cpu_ms_per_handshake", 1e3),
             ("lives_per_s", "server_cpu_us_per_life", 1e6),
             ("refusals_per_s", "server_cpu_us_per_refusal", 1e6)]
    for rate, name, scale in units:
        if result.get(rate) and duration:
            return {name: round(cpu / (result[rate] * duration) * scale, 4)}
    return {}


def redis_figures(start, end, lines_sent):
    """Commands the nodes sent Redis and its CPU, over the run and the
    drain; commands per chat line (MSG, or DM) the clients sent."""
    calls = end[0] - start[0]
    return {"redis_calls": calls, "redis_cpu_s": round(end[1] - start[1], 3),
            "redis_calls_per_msg": round(calls / lines_sent, 4) if lines_sent else None}


def tool_figures(setups, runs, span):
    """The tool's own CPU while it ran the load, and whether it was the
    limit: its processes together near the cores they had, or one of them
    near a whole core (its clients then wait for it, not for the server).
    Time spent waiting for a CPU (a machine busy with other work) counts
    as busy: the tool wanted that CPU."""
    cpu = [r["cpu"] - s["cpu"] for s, r in zip(setups, runs)]
    wait = [r["wait"] - s["wait"] for s, r in zip(setups, runs)]
    busy = [c + w for c, w in zip(cpu, wait)]
    cores = min(len(busy), os.cpu_count() or 1)
    span = max(span, 1e-3)
    return {"tool_cpu_pct": round(100 * sum(cpu) / span, 1),
            "tool_cpu_wait_pct": round(100 * sum(wait) / span, 1), "tool_cores": cores,
            "tool_bound": sum(busy) >= TOOL_BOUND * cores * span
            or max(busy) >= TOOL_BOUND * span}


def slow_memory_bound(args, result, failures, examples):
    """Slow readers must cost the server at most a few --max-pending each."""
    growth = result.get("server_peak_rss_mb", 0) - result.get("server_rss_start_mb", 0)
    bound = args.slow * 4 * args.max_pending / 2 ** 20 + 64
    result["server_rss_bound_mb"] = round(bound, 1)
    if result.get("server_rss_start_mb") is not None and growth > bound:
        failures["server-memory-unbounded"] += 1
        examples["server-memory-unbounded"] = ["peak RSS grew %.1f MB, bound %.1f MB"
                                              % (growth, bound)]


def config_for(args, targets, spread):
    """The picklable plan every stress process gets."""
    cfg = dict(vars(args))
    cfg.update(targets=targets, spread=spread,
               prefix=(args.prefix or "".join(random.choice(string.ascii_lowercase)
                                              for _ in range(4))).encode())
    if args.scenario == "slow":
        cfg["rate"] = 0
        cfg["sample"] = 50
        rng = random.Random(1)
        cfg["slow_set"] = frozenset(rng.sample(range(args.senders, args.clients), args.slow))
    elif args.scenario in ("fanout", "upgrade"):
        cfg["slow_set"] = frozenset()
    cfg.setdefault("check", "all")
    cfg.setdefault("window", 0)
    population = {"dm": 2 * getattr(args, "pairs", 0),
                  "churn": getattr(args, "observers", 0) + getattr(args, "clients", 0)
                  }.get(args.scenario) or args.clients
    cfg["procs"] = max(1, min(args.procs, population))
    # --attack: the guessers' indexes come after, from addresses of their own.
    cfg["first_guesser"] = -(-population // PER_ADDRESS) * PER_ADDRESS
    if args.concurrency is None and cfg.get("password"):
        # The server checks at most MAX_FAILURES passwords at once per
        # address (README: "Accounts"), the next get ERR too-many-attempts,
        # and PER_ADDRESS clients in a row share one.
        cfg["procs"] = min(cfg["procs"], MAX_FAILURES)
        cfg["concurrency"] = MAX_FAILURES // cfg["procs"]
    elif args.concurrency is None:
        cfg["concurrency"] = CONCURRENCY
    return cfg


def spawn_args(args):
    """Server options for a load test: no flood control, no per-address cap;
    for upgrades, room for every TLS relay they leave (its cost is measured)."""
    extra = ["--rate", "0", "--max-per-ip", "0", "--idle-timeout", "600",
             "--login-timeout", "0"]
    if args.scenario == "slow":
        extra += ["--max-pending", str(args.max_pending)]
    if args.scenario == "upgrade":
        extra += ["--max-tls-relays", str(args.upgrades * max(args.workers, 8) + 1)]
    return extra + args.server_arg


def spawn(args, tls=None, control=None):
    """The servers --spawn-server or --spawn-cluster asks for, started: (the
    servers, the cluster or None). With ``tls`` (a certificate and its key)
    they serve TLS: with --tls only, on the port the clients go to, else
    on a port of its own beside (``tls_port``). With ``control`` (a
    path, for --ctl) the server's control socket is there, and its state
    directory beside it: by default a ban would be saved under the user's
    home and greet the next server on that port. Without it neither option
    is given, which a --broker from before the control socket would refuse."""
    if args.spawn_cluster:
        cluster = start_cluster(args.spawn_cluster, workers=args.workers,
                                extra_args=spawn_args(args), name="stress",
                                die_with_parent=True, tls=tls, tls_only=args.tls,
                                broker=args.broker)
        return cluster.nodes, cluster
    if args.spawn_server:
        extra = ["--control", control, "--state-dir",
                 os.path.join(os.path.dirname(control), "state")] if control else []
        return [Server(*spawn_args(args), *extra, host=args.host, workers=args.workers,
                       die_with_parent=True, tls=tls, tls_only=args.tls,
                       broker=args.broker).start()], None
    return [], None


def accounts_to_register(cfg):
    """``account add NAME PASSWORD`` for each name the run logs in to with
    a password (``connect --password``) or guesses the password of
    (``--attack``: one nobody knows)."""
    prefix, accounts = cfg["prefix"], []
    if cfg.get("password"):
        accounts += [(Connect.client_name(prefix, i), cfg["password"])
                     for i in range(cfg["clients"])]
    if cfg.get("attack"):
        unknown = secrets.token_urlsafe(16)
        accounts += [(UnderAttack.victim_name(prefix, k), unknown)
                     for k in range(UnderAttack.VICTIMS)]
    return ["account add %s %s" % (name.decode(), password) for name, password in accounts]


def operate(path, commands):
    """Send the operator's ``commands`` over one connection to the control
    socket at ``path`` and read each answer, lines until ``OK`` or ``ERR
    ...``, as it comes; StressError at the first that is not ``OK``. The
    server takes one command at a time, in order: CTL_AHEAD more wait in the
    socket, so that it never waits for the next."""
    commands = list(commands)
    if not commands:
        return
    command, sent = commands[0], 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(CTL_TIMEOUT)
        try:
            sock.connect(path)
            with sock.makefile("rb") as answers:
                for done, command in enumerate(commands):
                    ahead = commands[sent:done + 1 + CTL_AHEAD]
                    if ahead:
                        sock.sendall(b"".join(line.encode() + b"\n" for line in ahead))
                        sent += len(ahead)
                    answer = answer_end(answers)
                    if answer != "OK":
                        raise StressError("control socket: %r: %s" % (
                            shown(command),
                            answer or "the server closed the control socket unanswered"))
        except OSError as exc:
            raise StressError("control socket: %r: %s" % (shown(command), exc))


def answer_end(answers):
    """The line that ends the next answer read from ``answers``, ``OK`` or
    ``ERR ...`` (the lines before it skipped); None at the end of the stream."""
    for raw in answers:
        line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
        if is_last_line(line):
            return line
    return None


def shown(command):
    """``command`` as an error message may show it: without its password."""
    words = command.split(None, 3)
    return " ".join(words[:3]) if takes_secret(words[:3]) else command


def wants_tls(args):
    """Whether the run needs a server that speaks TLS: --tls, or upgrade's --tls-share."""
    return args.tls or getattr(args, "tls_share", 0) > 0


def registering(args):
    """Whether the tool registers the names it needs on the server it spawns."""
    return args.spawn_server and bool(getattr(args, "password", None)
                                      or getattr(args, "attack", 0))


def one_or_all(values):
    return values[0] if len(values) == 1 else values


def run(args):
    """One scenario from start to end; (result dict, exit status)."""
    raise_nofile_limit()
    result = {"scenario": args.scenario, "tls": args.tls}
    failures, examples = Counter(), {}
    servers, cluster, fleet, scratch = [], None, None, None
    tool_cpu0 = own_cpu()
    try:
        spawning = args.spawn_server or args.spawn_cluster
        operator = args.ctl or registering(args) or args.scenario == "upgrade"
        if spawning and (wants_tls(args) or operator):  # the certificate, the control socket
            scratch = tempfile.mkdtemp(prefix="chat-stress-")
        tls = self_signed(scratch) if spawning and wants_tls(args) else None
        control = os.path.join(scratch, "control.sock") if operator else None
        servers, cluster = spawn(args, tls, control)
        if args.scenario == "upgrade":
            args.control, args.tls_target = control, (args.host, servers[0].tls_port)
        if args.ctl:
            result["ctl"] = args.ctl
        if servers:
            host = "127.0.0.1" if cluster else args.host
            args.targets = [(host, server.port) for server in servers]
            args.server_pid = [server.proc.pid for server in servers]
        targets = [(socket.gethostbyname(host), port) for host, port in args.targets]
        spread = not args.no_spread and all(ipaddress.ip_address(address).is_loopback
                                            for address, _ in targets)
        result.update(host=one_or_all(sorted({host for host, _ in args.targets})),
                      port=one_or_all([port for _, port in args.targets]),
                      server_pid=one_or_all(args.server_pid or [0]))
        cfg = config_for(args, targets, spread)
        result["procs"] = cfg["procs"]
        # A ban reaches the acceptor a moment after its OK: the stress
        # processes start long after that (and the run 0.2 s later still).
        accounts = accounts_to_register(cfg) if registering(args) else []
        operate(control, args.ctl + accounts)
        if accounts:
            result["registered"] = len(accounts)
        live = not args.quiet and not args.json and sys.stderr.isatty()
        monitor = Monitor(args.server_pid, live)
        fleet = Fleet(cfg, monitor)
        monitor.fleet = fleet
        start = monitor.usage()
        if start:
            result["server_rss_start_mb"] = round(start[1] / 2 ** 20, 1)
        try:
            figures, failures, examples = drive(args, cfg, fleet, monitor,
                                                cluster.redis if cluster else None)
        finally:
            monitor.end_line()
        result.update(figures)
        if args.scenario == "slow":
            slow_memory_bound(args, result, failures, examples)
    except (StressError, StartError, RuntimeError, OSError) as exc:
        failures["fatal"] += 1
        examples["fatal"] = [str(exc)]
    finally:
        tool_cpu = (fleet.stop() if fleet else 0.0) + own_cpu() - tool_cpu0
        result["tool_cpu_s"] = round(tool_cpu, 2)
        codes = cluster.stop() if cluster else [server.shutdown() for server in servers]
        if codes:
            result["server_exit"] = one_or_all(codes)
            if any(code != 0 for code in codes):
                failures["server-exit"] += 1
                examples["server-exit"] = ["server exited with %s after SIGTERM"
                                           % one_or_all(codes)]
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    result["failures"] = dict(failures)
    result["examples"] = examples
    result["ok"] = not failures
    return result, 0 if not failures else 1


def summary(result):
    """The result as an aligned two-column table, failures last."""
    rows = [(k, v) for k, v in result.items() if k not in ("failures", "examples")]
    width = max(len(k) for k, _ in rows)
    lines = ["%-*s  %s" % (width, k, "-" if v is None else v) for k, v in rows]
    if result.get("tool_bound"):
        lines.append("NOTE: the tool was the limit (%s %% CPU and %s %% waiting for one, "
                     "on %d core(s)): the figures above measure the tool, not the server; "
                     "give it more cores (--procs, a quieter machine) or less to do "
                     "(--rate, fewer clients)" % (result["tool_cpu_pct"],
                                                  result["tool_cpu_wait_pct"],
                                                  result["tool_cores"]))
    if result["failures"]:
        lines.append("FAILURES:")
        for kind, count in sorted(result["failures"].items()):
            lines.append("  %s: %d" % (kind, count))
            lines += ["      e.g. %s" % text for text in result["examples"].get(kind, [])]
    else:
        lines.append("oracle: all checks passed")
    return "\n".join(lines)


# -- command line ------------------------------------------------------------------

EXAMPLES = {
    "fanout": "examples:\n"
              "  stress.py fanout --spawn-server --workers 2 --clients 1000 --senders 10 --duration 5\n"
              "  stress.py fanout --port 4000 --clients 200 --senders 2 --rate 500 --size 200\n"
              "  stress.py fanout --spawn-cluster 2 --workers 1 --clients 1000 --senders 10\n"
              "  stress.py fanout --tls --spawn-server --clients 1000 --senders 10",
    "dm": "examples:\n"
          "  stress.py dm --spawn-server --workers 2 --pairs 50 --duration 5\n"
          "  stress.py dm --port 4000 --server-pid $(pgrep -of 'broker.py') --pairs 10\n"
          "  stress.py dm --port 4000,4001 --server-pid 1234,1240 --pairs 50\n"
          "  stress.py dm --tls --port 6697 --server-pid 1234 --pairs 50\n"
          "  stress.py dm --spawn-server --workers 2 --pairs 50 --duration 10 --attack 200",
    "connect": "examples:\n"
               "  stress.py connect --spawn-server --workers 2 --clients 10000 --hold 2\n"
               "  stress.py connect --port 4000 --server-pid 1234 --clients 2000\n"
               "  stress.py connect --spawn-server --workers 2 --clients 200 --password hunter22",
    "churn": "examples:\n"
             "  stress.py churn --spawn-server --clients 100 --duration 5\n"
             "  stress.py churn --port 4000 --clients 50 --observers 5 --msgs 5",
    "ping": "examples:\n"
            "  stress.py ping --spawn-server --workers 4 --clients 100 --duration 5\n"
            "  stress.py ping --port 4000 --server-pid 1234 --clients 100\n"
            "  stress.py ping --spawn-server --workers 2 --clients 100 --attack 200",
    "handshake": "examples:\n"
                 "  stress.py handshake --spawn-server --workers 2 --clients 20 --duration 10\n"
                 "  stress.py handshake --port 6697 --server-pid 1234 --clients 20",
    "refused": "examples:\n"
               "  stress.py refused --spawn-server --workers 2 --ctl 'ban 127.0.0.0/8' "
               "--clients 200 --duration 5\n"
               "  stress.py refused --port 4000 --server-pid 1234 --clients 200\n"
               "      (against a running server: broker.py ctl ban 127.0.0.0/8 first)\n"
               "a refusal against a login, 200 in flight, each on a fresh server:\n"
               "  stress.py refused --spawn-server --ctl 'ban 127.0.0.0/8' --procs 2 --clients 200\n"
               "  stress.py connect --spawn-server --procs 2 --concurrency 100 --clients 2000\n"
               "  then refusals_per_s against logins_per_s, and server_cpu_us_per_refusal\n"
               "  against server_cpu_us_per_login",
    "slow": "examples:\n"
            "  stress.py slow --spawn-server --clients 50 --slow 5\n"
            "  stress.py slow --port 4000 --server-pid 1234 --clients 100 --slow 10",
    "upgrade": "examples:\n"
               "  stress.py upgrade --spawn-server --clients 2000 --upgrades 20 --every 3\n"
               "  stress.py upgrade --spawn-server --clients 300 --upgrades 3 --tls-share 0\n"
               "  stress.py upgrade --spawn-server --upgrades 5 --upgrade-args='--workers 3'\n"
               "  stress.py upgrade --spawn-server --upgrades 0      (the same load, no upgrade)",
}


def build_parser():
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="server address (default %(default)s)")
    g.add_argument("--port", type=number_list, default=[4000], metavar="PORT[,PORT...]",
                   help="server port; the nodes' ports of a cluster, client i going to "
                        "port i mod n (default 4000)")
    g.add_argument("--target", action="append", type=host_port, default=[],
                   metavar="HOST:PORT", help="a server or a node (repeat; instead of "
                                             "--host and --port), client i to the i mod n-th")
    g.add_argument("--spawn-server", action="store_true",
                   help="start broker.py on a free port for this run, stop it at the end")
    g.add_argument("--spawn-cluster", type=int, default=0, metavar="N",
                   help="start a redis-server and N nodes sharing it on loopback for this "
                        "run, stop them at the end; reports Redis's commands and CPU")
    g.add_argument("--broker", default=BROKER, metavar="PATH",
                   help="the broker.py --spawn-* start (default: this tree's; another "
                        "checkout's, e.g. a git worktree of an older commit, to compare)")
    g.add_argument("--workers", type=int, default=2,
                   help="--workers of the spawned server, or of each node (default %(default)s)")
    g.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="extra option for the spawned server (repeat; use --server-arg=--x)")
    g.add_argument("--server-pid", type=number_list, default=[], metavar="PID[,PID...]",
                   help="pid of a running server (or of each node): report their CPU and "
                        "memory, summed, from /proc")
    g.add_argument("--ctl", action="append", default=[], metavar="COMMAND",
                   help="an operator's command (as for 'broker.py ctl') sent to the "
                        "spawned server's control socket before the load starts, e.g. "
                        "'ban 127.0.0.0/8' (repeat; --spawn-server only)")
    g.add_argument("--tls", action="store_true",
                   help="every client speaks TLS (no certificate check): --port and "
                        "--target are then TLS ports; --spawn-* make a throw-away "
                        "certificate with openssl and start the servers --tls-only")
    g = common.add_argument_group("tool")
    g.add_argument("--procs", type=int, default=os.cpu_count() or 1,
                   help="stress processes (default: number of CPUs, %(default)s)")
    g.add_argument("--concurrency", type=int, default=None,
                   help="connects + logins in flight per process (default %d; with "
                        "--password, %d in all)" % (CONCURRENCY, MAX_FAILURES))
    g.add_argument("--setup-timeout", type=float, default=120, help="seconds (default %(default)s)")
    g.add_argument("--drain-timeout", type=float, default=20,
                   help="seconds to wait for lines in flight at the end (default %(default)s)")
    g.add_argument("--no-spread", action="store_true",
                   help="do not spread clients over 127.x source addresses")
    g.add_argument("--prefix", default=None, help="user name prefix (default: random)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    g.add_argument("--quiet", action="store_true", help="no live progress line on stderr")

    p = argparse.ArgumentParser(
        prog="chat-stress", description=__doc__.split("\n\n")[0],
        epilog="Run 'chat-stress SCENARIO --help' for a scenario's options. "
               "Exit status: 0 when every check passed, 1 otherwise.\n\n" +
               "\n".join(EXAMPLES[k].split("\n")[1] for k in EXAMPLES),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="scenario", required=True, metavar="SCENARIO")

    def scenario(name, text):
        return sub.add_parser(name, parents=[common], help=text, description=text,
                              epilog=EXAMPLES[name],
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    f = scenario("fanout", "N clients log in, S of them send MSG, all read; "
                           "msgs/s in, deliveries/s out, latency")
    f.add_argument("--clients", type=int, default=1000)
    f.add_argument("--senders", type=int, default=10)
    f.add_argument("--duration", type=float, default=5.0, help="seconds of sending")
    f.add_argument("--rate", type=float, default=0,
                   help="total msgs/s over all senders (default 0: as fast as the server goes)")
    f.add_argument("--size", type=int, default=64, help="bytes of message text (min 32)")
    f.add_argument("--window", type=int, default=0,
                   help="msgs a sender may be ahead of the slowest reader "
                        "(default: %d KiB of lines per reader)" % (WINDOW_BYTES // 1024))
    f.add_argument("--sample", type=int, default=50,
                   help="every Nth message carries its send time (default %(default)s)")
    f.add_argument("--check", choices=("all", "sample"), default="all",
                   help="all: every receiver checks every line; sample: one in fifty "
                        "does (and times messages), the others count their lines (for "
                        "measuring a server faster than the checks; default %(default)s)")

    d = scenario("dm", "P pairs bounce a DM; round trips/s, RTT percentiles")
    d.add_argument("--pairs", type=int, default=50)
    d.add_argument("--duration", type=float, default=5.0)
    attack_option(d)

    c = scenario("connect", "open and log in N clients; logins/s, server memory per client")
    c.add_argument("--clients", type=int, default=1000)
    c.add_argument("--hold", type=float, default=1.0, help="seconds to stay connected")
    c.add_argument("--settle", type=float, default=1.0,
                   help="seconds after the last login before reading the server's RSS")
    c.add_argument("--password", metavar="PW",
                   help="log in with LOGIN NAME PW; --spawn-server registers every "
                        "client's name first (account add, ~40 ms each: keep --clients "
                        "small); against a running server, register PREFIXc0, PREFIXc1... "
                        "(--prefix) with broker.py ctl account add")

    i = scenario("ping", "N clients, each with one PING in flight; PONGs/s, round trips")
    i.add_argument("--clients", type=int, default=100)
    i.add_argument("--duration", type=float, default=5.0)
    attack_option(i)

    k = scenario("handshake", "TLS (implies --tls): N at a time connect, shake hands, "
                              "PING and close; handshakes/s, server CPU per handshake")
    k.add_argument("--clients", type=int, default=20, help="connections at a time")
    k.add_argument("--duration", type=float, default=5.0)

    h = scenario("churn", "clients connect, log in, chat and leave; every INFO accounted for")
    h.add_argument("--clients", type=int, default=100, help="clients churning at once")
    h.add_argument("--observers", type=int, default=10, help="clients staying all along")
    h.add_argument("--duration", type=float, default=5.0)
    h.add_argument("--msgs", type=int, default=3, help="MSGs per life (default %(default)s)")
    h.add_argument("--size", type=int, default=32)

    x = scenario("refused", "N connections at a time from banned addresses: each must "
                            "get one line (ERR banned) and EOF; refusals/s, server CPU "
                            "per refusal")
    x.add_argument("--clients", type=int, default=200, help="connections at a time")
    x.add_argument("--duration", type=float, default=5.0)
    x.add_argument("--expect-line", default="ERR banned", metavar="LINE",
                   help="the one line each must get (default: %(default)s)")
    x.add_argument("--timeout", type=float, default=5.0, metavar="S",
                   help="seconds from a connect to its EOF (default %(default)s)")

    s = scenario("slow", "some clients stop reading while others chat; "
                         "they must be cut with ERR slow-consumer, the others lose nothing")
    s.add_argument("--clients", type=int, default=50)
    s.add_argument("--slow", type=int, default=5, help="clients that stop reading")
    s.add_argument("--senders", type=int, default=2)
    s.add_argument("--duration", type=float, default=20.0,
                   help="longest time to wait for every slow client to be cut")
    s.add_argument("--size", type=int, default=1024)
    s.add_argument("--window", type=int, default=0)
    s.add_argument("--max-pending", type=int, default=1 << 20,
                   help="the server's --max-pending (passed on when spawning; "
                        "used for the memory bound)")

    u = scenario("upgrade", "fanout at a steady rate while the spawned server upgrades "
                            "itself K times (ctl upgrade), newcomers arriving: nobody may "
                            "notice; each upgrade's time, delays during and outside them")
    u.add_argument("--clients", type=int, default=2000)
    u.add_argument("--senders", type=int, default=20)
    u.add_argument("--rate", type=float, default=200,
                   help="total msgs/s over all senders (default %(default)s)")
    u.add_argument("--size", type=int, default=64, help="bytes of message text (min 32)")
    u.add_argument("--sample", type=int, default=5,
                   help="every Nth message carries its send time (default %(default)s)")
    u.add_argument("--check", choices=("all", "sample"), default="all",
                   help="as for fanout (default %(default)s)")
    u.add_argument("--tls-share", type=float, default=0.25, metavar="F",
                   help="this share of the clients and newcomers speak TLS, to the "
                        "spawned server's TLS port (default %(default)s; 0: none)")
    u.add_argument("--upgrades", type=int, default=20, metavar="K")
    u.add_argument("--every", type=float, default=3.0, metavar="S",
                   help="seconds of load before the first upgrade, between two, and "
                        "after the last (default %(default)s)")
    u.add_argument("--upgrade-args", type=shlex.split, default=[], metavar="OPTIONS",
                   help="server options each ctl upgrade passes, e.g. "
                        "--upgrade-args='--workers 3'")
    u.add_argument("--arrivals", type=float, default=5,
                   help="new connections a second all through the run, each logging "
                        "in and staying (default %(default)s)")
    return p


def attack_option(parser):
    parser.add_argument("--attack", type=int, default=0, metavar="N",
                        help="N more connections guess passwords all through the run, as "
                             "fast as answered: guesses/s and the answers' split beside the "
                             "figures, which are as without (victims PREFIXvictim0..%d: "
                             "--spawn-server registers them; else register them and give "
                             "--prefix)" % (UnderAttack.VICTIMS - 1))


def number_list(text):
    """``4000,4001`` -> [4000, 4001]"""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError("not a number or a comma-separated list: %r" % text)


def host_port(text):
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError("not HOST:PORT: %r" % text)
    return host.strip("[]"), int(port)


def check_args(parser, args):
    if args.scenario == "handshake":
        args.tls = True
    if args.scenario == "refused" and args.tls:
        parser.error("refused: the server refuses a TLS client without a word; no --tls")
    if args.spawn_server and args.spawn_cluster:
        parser.error("--spawn-server or --spawn-cluster, not both")
    if (getattr(args, "password", None) or getattr(args, "attack", 0)) and args.spawn_cluster:
        parser.error("--password, --attack: the tool registers the names on the server "
                     "--spawn-server starts; for a cluster, start it with scripts/cluster.py, "
                     "register them with broker.py ctl account add, give --port and --prefix")
    if args.ctl and not args.spawn_server:
        parser.error("--ctl talks to the server --spawn-server starts: for a running "
                     "server, use 'broker.py ctl' before the run")
    if args.target and (args.spawn_server or args.spawn_cluster):
        parser.error("--target names running servers: not with --spawn-*")
    if args.scenario == "upgrade":
        if not args.spawn_server:
            parser.error("upgrade: it runs 'broker.py ctl upgrade' on the server "
                         "--spawn-server starts")
        if args.tls:
            parser.error("upgrade: --tls-share 1 for every client over TLS")
        if not 0 <= args.tls_share <= 1:
            parser.error("--tls-share is a share of the clients: 0 to 1")
        args.duration = (args.upgrades + 1) * args.every
    if wants_tls(args) and (args.spawn_server or args.spawn_cluster) \
            and not shutil.which("openssl"):
        parser.error(OPENSSL_HINT)
    args.targets = args.target or [(args.host, port) for port in args.port]
    if getattr(args, "size", 64) < 32:
        parser.error("--size must be at least 32")
    if args.scenario in ("fanout", "slow", "upgrade") and not 0 < args.senders <= args.clients:
        parser.error("need 1 <= --senders <= --clients")
    if args.scenario == "slow" and not 0 < args.slow <= args.clients - args.senders:
        parser.error("need 1 <= --slow <= --clients - --senders")
    if args.procs < 1:
        parser.error("--procs must be at least 1")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    result, status = run(args)
    try:
        print(json.dumps(result) if args.json else summary(result), flush=True)
    except BrokenPipeError:
        pass
    return status


if __name__ == "__main__":
    sys.exit(main())
