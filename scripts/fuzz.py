#!/usr/bin/env python3
"""chat-fuzz: seeded hostile input for the chat server, and a memory bound.

Two modes:

``fuzz.py [fuzz] --seed N --duration S``
    A seeded generator (``random.Random(seed)``) makes lines and byte
    streams: random bytes, huge lines, lines cut at every byte boundary, NULs,
    invalid UTF-8, terminal escapes, bidi overrides, telnet's commands
    (0xff bytes), thousands of pipelined commands, half-closed and reset
    sockets. They go to the sans-IO module (``LineReader``, ``parse_line``:
    no exception, same lines whatever the chunking, every reply a known
    line) and to a running server, while
    well-behaved "probe" clients check PING/PONG, a DM to themselves and WHO.
    At the end every server process must still be the same one (pid and
    role), and the memory (sum of VmRSS) back near where it started. The
    seed is printed first, so any failure reproduces with ``--seed``.

``fuzz.py hostile --clients 1000 --duration S``
    1000 hostile clients each doing their worst at once -- never reading
    while others chat, sending lines just under --max-line, trickling bytes of
    a line that never ends -- and reconnecting when the server cuts them,
    while a few well-behaved clients chat and PING. Prints the peak of the
    server's total RSS and the PING round-trip percentiles.

Exit status 0 when every check held, 1 otherwise. Standard library only;
Linux (for /proc).
"""

import argparse
import multiprocessing
import os
import random
import re
import select
import selectors
import socket
import sys
import threading
import time

if not __package__:     # run as a file, python3 scripts/fuzz.py: see __init__.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = os.path.basename(os.path.dirname(os.path.abspath(__file__)))

from chatlib import protocol  # noqa: E402
from chatlib.protocol import (TOO_LONG, Dm, Hangup, LineReader, Login, Msg,  # noqa: E402
                              Ping, Quit, Reply, Who, parse_line)
from chatlib.telnet import INTERRUPT, Answer                    # noqa: E402

from .harness import Client, Server, percentile  # noqa: E402
from .procfs import process_role, usage  # noqa: E402

MAX_LINE = 4096
FFFD = "\ufffd"
UNSAFE = set(chr(c) for c in protocol._UNSAFE_CODES)
ERR_LINES = {v for k, v in vars(protocol).items() if k.startswith("ERR_")}
KNOWN_REPLIES = ERR_LINES | {protocol.OK, protocol.PONG}
NAME = r"[A-Za-z0-9_.\-]{1,32}"
SERVER_LINE = re.compile(r"(OK|PONG|ERR [a-z-]+|USER %s|INFO %s disconnected"
                         r"|(MSG|DM) %s [^ \t](.*[^ \t])?)\Z" % (NAME, NAME, NAME), re.S)
# What the server answers telnet's negotiation with (IAC WILL/WONT/DONT x),
# between its lines: nothing else it sends holds a 0xff byte.
TELNET_ANSWER = re.compile(rb"\xff[\xfb\xfc\xfe].", re.S)

ESCAPES = [b"\x1b[2J", b"\x1b[31m", b"\x1b]0;pwned\x07", b"\x1b[1;1H", b"\x07", b"\x08\x08",
           b"\x9b31m", "\u202e".encode(), "\u2066".encode(), "\u0085".encode(), b"\x7f",
           b"\x00", b"\r", b"\x0b", b"\x0c"]
BAD_UTF8 = [b"\xff", b"\xfe\xff", b"\xc3", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
            b"\xe2\x82", b"\x80\x80", b"\xf0\x9f\x98"]
GOOD = [b"hello", b"hi there", "caf\u00e9".encode(), "\U0001f600".encode(), b"\t",
        b"   ", b"a\tb", "e\u0301".encode(), "\u4e2d\u6587".encode(), b"x" * 40]
# telnet's: Ctrl-C, negotiation, a window size, NOP, AYT, a 0xff of text.
TELNET = [b"\xff\xf4\xff\xfd\x06", b"\xff\xfd\x06", b"\xff\xfb\x1f", b"\xff\xfd\x01",
          b"\xff\xfe\x01", b"\xff\xfc\x03", b"\xff\xfa\x1f\x00\x50\x00\x18\xff\xf0",
          b"\xff\xf1", b"\xff\xf6", b"\xff\xff"]
WORDS = [b"LOGIN", b"login", b"Login", b"MSG", b"msg", b"DM", b"dm", b"WHO", b"who",
         b"PING", b"ping", b"QUIT", b"FOO", b"", b"GET", b"USER", b"OK", b"PONG"]


# -- the generator -------------------------------------------------------------

class Gen:
    """Everything random comes from here, from one seed."""

    def __init__(self, seed, max_line=MAX_LINE):
        self.seed = seed
        self.rng = random.Random(seed)
        self.max_line = max_line

    def ws(self):
        return self.rng.choice([b" ", b"  ", b"\t", b" \t ", b""])

    def name(self):
        r = self.rng.random()
        if r < 0.6:
            alphabet = b"abcXYZ019_.-"
            return bytes(self.rng.choice(alphabet) for _ in range(self.rng.randint(1, 32)))
        if r < 0.7:
            return b"n" * self.rng.choice([0, 33, 100])
        return self.text(8)

    def text(self, pieces=6):
        out = []
        for _ in range(self.rng.randint(0, pieces)):
            r = self.rng.random()
            pool = ESCAPES if r < 0.3 else BAD_UTF8 if r < 0.5 else GOOD
            out.append(self.rng.choice(pool))
            out.append(self.ws())
        return b"".join(out).replace(b"\n", b"")

    def random_bytes(self, n, newlines=False):
        data = self.rng.getrandbits(8 * n).to_bytes(n, "little") if n else b""
        return data if newlines else data.replace(b"\n", b"?")

    def line(self):
        """One line, without its terminator; one in ten with a telnet
        command somewhere in it."""
        line = self.plain_line()
        if self.rng.random() < 0.1:
            at = self.rng.randint(0, len(line))
            line = line[:at] + self.rng.choice(TELNET) + line[at:]
        return line

    def plain_line(self):
        r = self.rng.random()
        if r < 0.55:
            word = self.rng.choice(WORDS)
            args = self.rng.choice([b"", self.name(), self.text(),
                                    self.name() + self.ws() + self.text()])
            return self.ws() + word + self.ws() + args + self.rng.choice([b"", b" ", b"\r"])
        if r < 0.7:
            return self.random_bytes(self.rng.randint(0, 64))
        if r < 0.8:                   # around the limit, and far over it
            size = self.rng.choice([self.max_line - 2, self.max_line - 1, self.max_line,
                                    self.max_line + 1, self.max_line * 3])
            return (b"MSG " + b"y" * size)[:size]
        if r < 0.85:
            return self.rng.choice([b"GET / HTTP/1.1", b"POST /x HTTP/1.0", b"Host: a",
                                    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"])
        if r < 0.9:
            return self.rng.choice([b"", b" ", b"\t\t", b"\r", b"\x00"])
        return self.text(20)

    def stream(self, n_lines):
        """Lines joined by LF or CRLF; sometimes a last line without one."""
        parts = []
        for _ in range(n_lines):
            parts.append(self.line())
            parts.append(self.rng.choice([b"\n", b"\n", b"\r\n"]))
        if self.rng.random() < 0.3:
            parts.append(self.line())
        return b"".join(parts)

    def chunks(self, data):
        """Split ``data`` at random places (sometimes byte by byte)."""
        if len(data) < 2000 and self.rng.random() < 0.2:
            return [data[i:i + 1] for i in range(len(data))]
        out, i = [], 0
        while i < len(data):
            n = self.rng.choice([1, 2, 3, 7, 64, 500, 4096, 65536])
            out.append(data[i:i + n])
            i += n
        return out

    def anon_stream(self, n_lines):
        """A stream with no line that would log in (so its answers are known)."""
        data = self.stream(n_lines)
        for _ in range(2):
            lines = data.split(b"\n")
            for i, line in enumerate(lines):
                if type(parse_line(line.rstrip(b"\r"), False)) is Login:
                    lines[i] = b"X" + line
            data = b"\n".join(lines)
            if self.answers_known(data):
                return data
            data = data.replace(b"\xff", b"\xfe")   # no telnet, then
        return data

    def answers_known(self, data):
        """No line logs in once telnet's commands are out, and none is
        answered after an interrupt (the server answers those that came
        with it, in the same read: it depends on how the stream is cut)."""
        items = reference_lines(data, self.max_line)
        after = items[items.index(INTERRUPT):] if INTERRUPT in items else []
        return (not any(type(item) is Answer for item in after)
                and not any(type(item) is bytes and type(parse_line(item, False)) is Login
                            for item in items))


# -- sans-IO properties ----------------------------------------------------------

def reference_lines(data, max_line):
    """What LineReader must return for ``data``: an independent model of
    lines and of telnet's commands (RFC 854 as ``chatlib.telnet`` reads it:
    answers and interrupts where they come), a command at a time."""
    out, line, i, subnegotiation = [], bytearray(), 0, False

    def end_line():
        if len(line) + 1 > max_line:
            out.append(TOO_LONG)
        else:
            out.append(bytes(line[:-1] if line.endswith(b"\r") else line))

    while i < len(data):
        if data[i] != 0xFF:
            iac = data.find(b"\xff", i)
            text, i = data[i:iac if iac >= 0 else len(data)], iac if iac >= 0 else len(data)
        else:
            command = data[i + 1:i + 2]
            if not command or command in b"\xfb\xfc\xfd\xfe" and i + 2 >= len(data):
                break                                   # cut short: never finished
            if command in b"\xfb\xfc\xfd\xfe":           # WILL WONT DO DONT
                option = data[i + 2]
                if command == b"\xfd":
                    out.append(Answer(bytes([255, 251 if option == 6 else 252, option])))
                elif command == b"\xfb":
                    out.append(Answer(bytes([255, 254, option])))
                i += 3
                continue
            i += 2
            if command == b"\xff":
                text = b"\xff"
            elif command < b"\xf0":
                text = b"\xff" + command
            else:                                       # other commands: no text
                if command == b"\xfa":                  # SB
                    subnegotiation = True
                elif command == b"\xf0":                # SE
                    subnegotiation = False
                elif command == b"\xf4":                # IP
                    out.append(INTERRUPT)
                continue
        if subnegotiation:
            continue
        first, *more = text.split(b"\n")
        line += first
        for rest in more:
            end_line()
            line = bytearray(rest)
    return out


def feed_all(chunks, max_line):
    reader, lines = LineReader(max_line), []
    for chunk in chunks:
        lines += reader.feed(chunk)
        if reader.buffered > max_line + 3:          # a line, and a command cut short
            raise AssertionError("LineReader holds %d bytes" % reader.buffered)
    return lines


def clean_ok(text):
    """A delivered text: valid UTF-8, no unsafe character, trimmed, non-empty."""
    s = text.decode("utf-8")              # raises if not valid
    return (s != "" and not (set(s) & UNSAFE) and s[0] not in " \t" and s[-1] not in " \t")


def check_command(line, logged_in):
    """Problems with what parse_line makes of ``line``, as strings."""
    try:
        cmd = parse_line(line, logged_in)
    except Exception as exc:                  # noqa: BLE001 -- that is the finding
        return ["parse_line(%r, %s) raised %r" % (line[:80], logged_in, exc)]
    kind = type(cmd)
    bad = []
    if cmd is None:
        if line.strip(b" \t"):
            bad.append("non-blank line %r ignored" % line[:80])
    elif kind in (Reply, Hangup):
        if cmd.data not in KNOWN_REPLIES:
            bad.append("unknown reply %r" % cmd.data)
        if kind is Hangup and logged_in:
            bad.append("hang-up of a logged-in user for %r" % line[:80])
    elif kind is Msg or kind is Dm:
        if not logged_in:
            bad.append("%s before login" % kind.__name__)
        try:
            if not clean_ok(cmd.text):
                bad.append("unclean text %r from %r" % (cmd.text[:80], line[:80]))
        except UnicodeDecodeError:
            bad.append("invalid UTF-8 text %r" % cmd.text[:80])
        if protocol.clean_text(cmd.text) != cmd.text:
            bad.append("clean_text not idempotent on %r" % cmd.text[:80])
        if kind is Dm and not protocol.valid_name(cmd.target.encode()):
            bad.append("DM to invalid name %r" % cmd.target)
    elif kind is Login:
        if logged_in or not protocol.valid_name(cmd.name.encode()):
            bad.append("bad Login %r (logged_in=%s)" % (cmd.name, logged_in))
    elif kind is Who:
        if not logged_in:
            bad.append("WHO before login")
    elif kind not in (Ping, Quit):
        bad.append("unknown command object %r" % (cmd,))
    return bad


def check_sans_io(gen, rounds, max_line=MAX_LINE):
    """Fuzz LineReader and parse_line; return a list of problems (empty: fine)."""
    problems = []
    for r in range(rounds):
        data = gen.stream(gen.rng.randint(0, 40))
        try:
            expected = reference_lines(data, max_line)
            for chunks in ([data], gen.chunks(data), gen.chunks(data)):
                got = feed_all(chunks, max_line)
                if got != expected:
                    problems.append("round %d: chunking changed the lines of %r"
                                    % (r, data[:120]))
                    break
            if len(data) <= 600:              # cut at every byte boundary
                for i in range(len(data) + 1):
                    if feed_all([data[:i], data[i:]], max_line) != expected:
                        problems.append("round %d: a cut at byte %d changed the lines" % (r, i))
                        break
        except Exception as exc:              # noqa: BLE001
            problems.append("round %d: LineReader raised %r on %r" % (r, exc, data[:120]))
            continue
        for line in expected:
            if type(line) is not bytes:           # TOO_LONG, telnet's
                continue
            for logged_in in (False, True):
                problems += check_command(line, logged_in)
        if len(problems) > 20:
            break
    return problems


def expected_anon_answers(data, max_line):
    """The exact answers a connection that never logs in gets for ``data``
    followed by a half-close (uses the sans-IO module as the oracle)."""
    out = []
    for line in reference_lines(data, max_line):
        if line is TOO_LONG:
            out.append(protocol.ERR_LINE_TOO_LONG)
            continue
        if type(line) is Answer:
            out.append(line.data)
            continue
        if line is INTERRUPT:
            break
        cmd = parse_line(line, False)
        kind = type(cmd)
        if cmd is None:
            continue
        if kind is Ping:
            out.append(protocol.PONG)
        elif kind is Reply:
            out.append(cmd.data)
        elif kind is Hangup:
            out.append(cmd.data)
            break
        elif kind is Quit:
            break
        else:
            raise AssertionError("unexpected %r for an anonymous line" % (cmd,))
    return b"".join(out)


# -- /proc -----------------------------------------------------------------------

def total_rss_mib(server):
    return usage([server.proc.pid])[1] / 2 ** 20


def roles(server):
    return sorted((process_role(p), p) for p in server.pids())


def check_server_line(raw, problems, who):
    """One line a client got: valid UTF-8, no unsafe character, known shape."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        problems.append("%s got invalid UTF-8: %r" % (who, raw[:80]))
        return
    if set(line) & UNSAFE:
        problems.append("%s got an unsafe character: %r" % (who, raw[:80]))
    elif not SERVER_LINE.match(line):
        problems.append("%s got a malformed line: %r" % (who, raw[:80]))


# -- well-behaved probes ---------------------------------------------------------

class Probe(threading.Thread):
    """A logged-in client that keeps checking PING, a DM to itself and WHO."""

    def __init__(self, port, name, stop, every=0.05, timeout=5.0):
        super().__init__(daemon=True)
        self.port, self.name, self.stop_event = port, name, stop
        self.every, self.timeout = every, timeout
        self.rtts, self.problems, self.rounds = [], [], 0

    def run(self):
        try:
            with Client(self.port) as sock:
                sock.sendraw(b"LOGIN %s\n" % self.name.encode())
                line = sock.read_raw_line(self.timeout)
                if line != b"OK":
                    self.problems.append("%s: LOGIN answered %r" % (self.name, line))
                    return
                while not self.stop_event.is_set():
                    self.round(sock)
                    self.stop_event.wait(self.every)
        except (OSError, AssertionError) as exc:
            self.problems.append("%s after %d rounds: %s" % (self.name, self.rounds, exc))

    def round(self, sock):
        token = b"tok-%d" % self.rounds
        start = time.monotonic()
        deadline = start + self.timeout
        sock.sendraw(b"PING\n")
        while True:
            line = sock.read_raw_line(deadline - time.monotonic())
            if line == b"PONG":
                break
            self.other(line)
        self.rtts.append(time.monotonic() - start)
        sock.sendraw(b"DM %s %s\nWHO\nPING\n" % (self.name.encode(), token))
        got_dm, users = 0, []
        while True:
            line = sock.read_raw_line(deadline - time.monotonic())
            if line == b"PONG":
                break
            if line == b"DM %s %s" % (self.name.encode(), token):
                got_dm += 1
            elif line.startswith(b"USER "):
                users.append(line[5:])
            else:
                self.other(line)
        if got_dm != 1:
            self.problems.append("%s round %d: its DM to itself came %d times"
                                 % (self.name, self.rounds, got_dm))
        if self.name.encode() not in users:
            self.problems.append("%s round %d: not in its own WHO" % (self.name, self.rounds))
        self.rounds += 1

    def other(self, line):
        """Chat from the fuzzers: must be well-formed and clean."""
        if not (line.startswith(b"MSG ") or line.startswith(b"DM ") or
                line.startswith(b"INFO ")):
            self.problems.append("%s: unexpected %r" % (self.name, line[:80]))
        else:
            check_server_line(line, self.problems, self.name)


def ping_figures(rtts):
    """PING round trips (s): p50, p99 and max; NaN if none."""
    rtts = sorted(rtts) or [float("nan")]
    return dict(ping_p50=percentile(rtts, 0.5), ping_p99=percentile(rtts, 0.99),
                ping_max=rtts[-1])


# -- fuzzing a running server ------------------------------------------------------

class Session:
    """One hostile connection: what it sends, how it ends, what it expects."""

    def __init__(self, gen, serial, port, max_line):
        rng = gen.rng
        self.serial = serial
        kind = rng.choice(["anon", "anon", "pipeline", "chat", "garbage", "huge", "trickle"])
        self.kind = kind
        self.expected = None          # exact answers, when they are knowable
        self.ending = rng.choice(["halfclose", "halfclose", "close", "reset"])
        if kind == "anon":
            data = gen.anon_stream(rng.randint(1, 60))
        elif kind == "pipeline":
            n = rng.randint(500, 1500)
            cmds = [b"PING", b"WHO", b"DM nobody x", b"MSG x", b"", b"FOO"]
            data = b"".join(rng.choice(cmds) + b"\n" for _ in range(n))
        elif kind == "chat":
            lines = [b"LOGIN fz%d" % serial]
            for _ in range(rng.randint(1, 200)):
                r = rng.random()
                if r < 0.5:
                    lines.append(b"MSG " + gen.text(10))
                elif r < 0.8:
                    target = rng.choice([b"probe0", b"probe1", b"fz%d" % serial, gen.name()])
                    lines.append(b"DM " + target + b" " + gen.text(10))
                else:
                    lines.append(gen.line())
            data = b"\n".join(lines) + b"\n"
        elif kind == "garbage":
            data = gen.random_bytes(rng.randint(1, 200000), newlines=True)
        elif kind == "huge":
            data = b"z" * rng.randint(max_line, 2 << 20) + b"\nPING\n"
        else:                          # trickle: a byte at a time, then the rest
            data = gen.anon_stream(rng.randint(1, 5))
        if self.ending == "halfclose" and kind in ("anon", "pipeline", "huge", "trickle"):
            self.expected = expected_anon_answers(data, max_line)
        self.chunks = gen.chunks(data) if kind != "trickle" else [data[i:i + 1] for i in range(len(data))]
        if self.ending == "reset":     # give up somewhere in the middle
            self.chunks = self.chunks[:rng.randint(0, len(self.chunks))]
        self.got = b""
        self.sent_all = False
        self.done = False
        self.started = time.monotonic()
        source = "127.0.0.%d" % (2 + serial % 200)
        self.sock = socket.socket()
        self.sock.bind((source, 0))
        self.sock.setblocking(False)
        try:
            self.sock.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass

    def finish_sending(self):
        self.sent_all = True
        if self.ending == "halfclose":
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        elif self.ending == "reset":
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            self.done = True
        else:
            self.done = True

    def on_writable(self):
        try:
            while self.chunks:
                n = self.sock.send(self.chunks[0])
                if n < len(self.chunks[0]):
                    self.chunks[0] = self.chunks[0][n:]
                    return
                self.chunks.pop(0)
                if self.kind == "trickle":
                    return             # one byte per loop turn
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.done = True
            return
        self.finish_sending()

    def on_readable(self):
        try:
            data = self.sock.recv(262144)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.done = True
        self.got += data

    def judge(self, problems):
        """Check what came back; True if it was compared with the oracle."""
        where = "session %d (%s, %s)" % (self.serial, self.kind, self.ending)
        lines = TELNET_ANSWER.sub(b"", self.got).split(b"\n")
        lines.pop()
        for raw in lines:
            check_server_line(raw, problems, where)
        if self.expected is not None and self.sent_all and self.got != self.expected:
            # flood control may cut a long pipeline: ERR flood ends it then
            if not (self.got.endswith(protocol.ERR_FLOOD)
                    and self.expected.startswith(self.got[:-len(protocol.ERR_FLOOD)])):
                problems.append("%s: answers differ from the oracle: got %d bytes %r..., "
                                "expected %d bytes %r..." % (where, len(self.got), self.got[:60],
                                                             len(self.expected), self.expected[:60]))
            return True
        return self.expected is not None and self.sent_all


def fuzz_server(server, gen, duration, concurrency=12, max_line=MAX_LINE, log=print):
    """Hostile sessions against ``server`` for ``duration`` seconds while two
    probes keep checking it. Returns (problems, figures)."""
    problems = []
    before = roles(server)
    rss_start = total_rss_mib(server)
    stop = threading.Event()
    probes = [Probe(server.port, "probe%d" % i, stop) for i in range(2)]
    for p in probes:
        p.start()
    sel = selectors.DefaultSelector()
    live, serial, judged, exact = set(), 0, 0, 0
    rss_peak, next_sample = rss_start, 0.0
    end = time.monotonic() + duration
    session_timeout = 20.0
    while time.monotonic() < end or live:
        now = time.monotonic()
        while now < end and len(live) < concurrency:
            s = Session(gen, serial, server.port, max_line)
            serial += 1
            live.add(s)
            sel.register(s.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, s)
        for key, mask in sel.select(0.05):
            s = key.data
            if mask & selectors.EVENT_WRITE and not s.sent_all and not s.done:
                s.on_writable()
                if s.sent_all and not s.done:
                    sel.modify(s.sock, selectors.EVENT_READ, s)
            if mask & selectors.EVENT_READ and not s.done:
                s.on_readable()
        for s in list(live):
            if not s.done and now - s.started > session_timeout:
                problems.append("session %d (%s, %s): no close within %.0f s (got %r...)"
                                % (s.serial, s.kind, s.ending, session_timeout, s.got[-80:]))
                s.done = True
            if s.done:
                sel.unregister(s.sock)
                s.sock.close()
                live.discard(s)
                exact += s.judge(problems)
                judged += 1
        if now >= next_sample:
            next_sample = now + 0.5
            rss_peak = max(rss_peak, total_rss_mib(server))
            if server.proc.poll() is not None:
                problems.append("the server exited with status %s" % server.proc.returncode)
                break
    stop.set()
    for p in probes:
        p.join(10)
        problems += p.problems
        if p.rounds == 0:
            problems.append("%s never completed a round" % p.name)
    after = roles(server)
    if after != before:
        problems.append("server processes changed: %s -> %s" % (before, after))
    rtts = [t for p in probes for t in p.rtts]
    figures = dict(sessions=judged, exact=exact, rss_start=rss_start, rss_peak=rss_peak,
                   rss_end=total_rss_mib(server), probe_rounds=sum(p.rounds for p in probes),
                   **ping_figures(rtts))
    if "Traceback" in server.log():
        problems.append("a traceback in the server log")
    return problems, figures


# -- hostile: many clients at their worst ------------------------------------------

def hostile_load(port, clients, duration, max_line, ready, counters):
    """Child process: ``clients`` connections that never read and misbehave.

    A third each: sleepers (log in, never read); big-liners (log in, never
    read, send a line just under --max-line now and then: some MSG, which
    everyone gets, some PING padded to the limit); tricklers (log in, never
    read, send a line one byte short of --max-line, then a byte a second: the
    line is finished (a padded PING) only when the limit is reached, and a new
    one begins). A connection the server closes comes back at once.
    """
    ep = select.epoll()
    socks = {}
    rng = random.Random(clients)
    big_msg = b"MSG " + b"b" * (max_line - 6) + b"\n"
    big_ping = b"PING" + b" " * (max_line - 6) + b"\n"
    trickle_head = b"PING" + b" " * (max_line - 7)   # + 2 bytes + newline: the limit
    trickled = {}

    def connect(i):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)   # fill up soon
        s.bind(("127.0.0.%d" % (10 + i // 50), 0))
        s.settimeout(10)
        s.connect(("127.0.0.1", port))
        s.sendall(b"LOGIN h%d\n" % i)
        if i % 3 == 2:
            s.sendall(trickle_head)
            trickled[i] = 0
        s.setblocking(False)
        ep.register(s.fileno(), select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR)
        socks[s.fileno()] = (i, s)

    for i in range(clients):
        connect(i)
    ready.set()
    end = time.monotonic() + duration
    next_tick = 0.0
    while time.monotonic() < end:
        for fd, _ in ep.poll(0.1):                   # the server closed it: back again
            i, s = socks.pop(fd)
            ep.unregister(fd)
            s.close()
            counters[0] += 1
            try:
                connect(i)
            except OSError:
                counters[1] += 1
        now = time.monotonic()
        if now >= next_tick:                          # once a second, each does its bit
            next_tick = now + 1.0
            for i, s in list(socks.values()):
                try:
                    if i % 3 == 1:
                        s.send(big_msg if rng.random() < 0.1 else big_ping)
                    elif i % 3 == 2:
                        trickled[i] += 1
                        if trickled[i] <= 2:
                            s.send(b" ")
                        else:
                            s.send(b"\n" + trickle_head)
                            trickled[i] = 0
                except OSError:
                    pass
    for _, s in socks.values():
        s.close()


def chatter(port, name, stop, every):
    """A well-behaved client that chats and reads everything."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"LOGIN %s\n" % name.encode())
    sock.setblocking(False)
    n = 0
    next_msg = 0.0
    while not stop.is_set():
        r, _, _ = select.select([sock], [], [], 0.01)
        if r:
            try:
                if not sock.recv(262144):
                    return
            except BlockingIOError:
                pass
        if time.monotonic() >= next_msg:
            next_msg = time.monotonic() + every
            try:
                sock.send(b"MSG %s says %d\n" % (name.encode(), n))
            except BlockingIOError:
                pass
            n += 1
    sock.close()


def run_hostile(server, clients, duration, probes=4, chatters=4, max_line=MAX_LINE, log=print):
    """Returns (problems, figures)."""
    problems = []
    before = roles(server)
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    counters = ctx.Array("l", 2)
    load = ctx.Process(target=hostile_load,
                       args=(server.port, clients, duration, max_line, ready, counters))
    rss_start = total_rss_mib(server)
    load.start()
    if not ready.wait(60):
        load.kill()
        return ["the hostile clients could not all connect within 60 s"], {}
    log("%d hostile clients connected; load for %.0f s" % (clients, duration))
    stop = threading.Event()
    chat = [threading.Thread(target=chatter, args=(server.port, "chat%d" % i, stop, 0.05),
                             daemon=True) for i in range(chatters)]
    pr = [Probe(server.port, "probe%d" % i, stop, every=0.02) for i in range(probes)]
    for t in chat + pr:
        t.start()
    rss_peak = rss_start
    end = time.monotonic() + duration
    while time.monotonic() < end and load.is_alive():
        rss_peak = max(rss_peak, total_rss_mib(server))
        time.sleep(0.25)
    stop.set()
    for t in chat + pr:
        t.join(10)
    load.join(30)
    for p in pr:
        problems += p.problems
    after = roles(server)
    if after != before:
        problems.append("server processes changed: %s -> %s" % (before, after))
    rtts = [t for p in pr for t in p.rtts]
    figures = dict(clients=clients, rss_start=rss_start, rss_peak=rss_peak,
                   rss_end=total_rss_mib(server), pings=len(rtts),
                   **ping_figures(rtts),
                   reconnects=counters[0], failed_reconnects=counters[1],
                   slow_cuts=server.log().count("(slow consumer)"))
    return problems, figures


# -- command line ------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", choices=["fuzz", "hostile"], default="fuzz")
    p.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds of load (default: fuzz 60, hostile 30)")
    p.add_argument("--rounds", type=int, default=3000, help="sans-IO rounds (fuzz)")
    p.add_argument("--clients", type=int, default=1000, help="hostile clients (hostile)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("server_args", nargs="*", help="extra broker.py options, after --")
    args = p.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    print("seed %d (re-run: %s %s --seed %d)" % (seed, sys.argv[0], args.mode, seed), flush=True)
    with Server(*args.server_args, workers=args.workers, die_with_parent=True) as server:
        if args.mode == "fuzz":
            gen = Gen(seed)
            problems = check_sans_io(gen, args.rounds)
            print("sans-IO: %d rounds, %d problems" % (args.rounds, len(problems)), flush=True)
            more, fig = fuzz_server(server, gen, args.duration or 60.0)
            problems += more
            print("server: %(sessions)d hostile sessions (%(exact)d checked line by line "
                  "against the oracle), %(probe_rounds)d probe rounds; "
                  "RSS %(rss_start).1f MiB -> peak %(rss_peak).1f -> end %(rss_end).1f; "
                  "probe PING p50 %(ping_p50).4f s p99 %(ping_p99).4f s max %(ping_max).4f s"
                  % fig)
        else:
            problems, fig = run_hostile(server, args.clients, args.duration or 30.0)
            if fig:
                print("hostile: %(clients)d clients; server RSS %(rss_start).1f MiB at start, "
                      "peak %(rss_peak).1f MiB, end %(rss_end).1f MiB; %(pings)d PINGs: "
                      "p50 %(ping_p50).4f s, p99 %(ping_p99).4f s, max %(ping_max).4f s; "
                      "%(slow_cuts)d slow-consumer cuts, %(reconnects)d reconnects "
                      "(%(failed_reconnects)d failed)" % fig)
    for line in problems[:50]:
        print("PROBLEM:", line)
    print("%s (seed %d)" % ("FAILED: %d problems" % len(problems) if problems else "OK", seed))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
