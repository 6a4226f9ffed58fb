"""Test harness: the real server as a subprocess, and line-oriented clients.

Every server runs in a fresh session (its own process group), so a test can
find and kill the whole process tree it started, including processes a
``forkserver`` started, and check that none is left over. Every blocking call
has a timeout, and :class:`TestCase` adds a per-test alarm on top.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BROKER = os.path.join(ROOT, "broker.py")
IO_TIMEOUT = 5.0            # seconds any single read may wait
TEST_TIMEOUT = 60           # seconds any single test may take
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from procfs import process_role, session_pids  # noqa: E402  (re-exported to the tests)
from harness import REDIS_HINT, RedisServer, redis_program  # noqa: E402,F401

START_METHODS = ["fork", "spawn", "forkserver"] if sys.platform != "win32" else ["spawn"]


def per_start_method(namespace, base):
    """Replace test class ``base`` in a module's ``namespace`` with one
    subclass per start method, named ``<base>_<method>``."""
    for method in START_METHODS:
        name = "%s_%s" % (base.__name__, method)
        namespace[name] = type(name, (base,), {"start_method": method})
    del namespace[base.__name__]


def requires_redis(cls):
    """Cluster tests need a real ``redis-server``: without one they skip,
    saying how to get it; under ``CI=true`` they run, and fail."""
    if redis_program() is None and os.environ.get("CI") != "true":
        return unittest.skip(REDIS_HINT)(cls)
    return cls


class Server:
    """``python broker.py`` on a free port; ``with Server(...) as s:``."""

    def __init__(self, *args, workers=2, start_method=None, idle_timeout=None, env=None):
        self.args = ["--host", "127.0.0.1", "--port", "0", "--workers", str(workers)]
        if start_method:
            self.args += ["--start-method", start_method]
        if idle_timeout is not None:
            self.args += ["--idle-timeout", str(idle_timeout)]
        self.args += [str(a) for a in args]
        self.env = dict(os.environ, **(env or {}))
        self.proc = None
        self.port = None
        self.log_lines = []
        self._listening = threading.Event()
        self._log_changed = threading.Condition()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.kill()

    def launch(self):
        """Start the process without waiting for it to listen."""
        self.proc = subprocess.Popen(
            [sys.executable, BROKER] + self.args, cwd=ROOT, env=self.env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True)
        self._log_reader = threading.Thread(target=self._read_log, daemon=True)
        self._log_reader.start()
        return self

    def start(self, timeout=30):
        self.launch()
        if not self._listening.wait(timeout):
            self.kill()
            raise AssertionError("server did not start:\n" + self.log())
        return self

    def _read_log(self):
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._log_changed:
                self.log_lines.append(line)
                self._log_changed.notify_all()
            m = re.search(r"listening on [^ ]+:(\d+)", line)
            if m and self.port is None:
                self.port = int(m.group(1))
                self._listening.set()

    def log(self):
        with self._log_changed:
            return "\n".join(self.log_lines)

    def wait_log_end(self, timeout=IO_TIMEOUT):
        """Wait until every process has closed the log pipe; True if so.

        Once the processes are gone, this makes :meth:`log` complete.
        """
        self._log_reader.join(timeout)
        return not self._log_reader.is_alive()

    def wait_log(self, pattern, timeout=IO_TIMEOUT, start=0):
        """Wait until a log line (from index ``start`` on) matches ``pattern``;
        return the match."""
        deadline = time.monotonic() + timeout
        with self._log_changed:
            while True:
                for line in self.log_lines[start:]:
                    m = re.search(pattern, line)
                    if m:
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("no log line matching %r after line %d in:\n%s"
                                         % (pattern, start, "\n".join(self.log_lines)))
                self._log_changed.wait(left)

    def log_lines_from(self, start):
        with self._log_changed:
            return list(self.log_lines[start:])

    def client(self, name=None):
        c = Client(self.port)
        if name is not None:
            c.login(name)
        return c

    def pids(self):
        return session_pids(self.proc.pid)

    def roles(self):
        """Process title -> pid, for every process of this server."""
        return {process_role(pid): pid for pid in self.pids()}

    def replacement(self, role, old_pid, within):
        """The pid of the new process titled ``role``, once it is running."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            pid = self.roles().get(role)
            if pid is not None and pid != old_pid:
                return pid
            time.sleep(0.02)
        raise AssertionError("no new %s within %.1f s:\n%s" % (role, within, self.log()))

    def stop(self, signum=signal.SIGTERM, timeout=10):
        """Signal the main process; return its exit status."""
        self.proc.send_signal(signum)
        return self.proc.wait(timeout)

    def kill(self):
        """Kill everything this server started, whatever state it is in."""
        if self.proc is None:
            return
        for pid in self.pids() + [self.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        # The reader thread closes the pipe at EOF: closing it under the
        # thread's feet would make its read fail.
        if self.wait_log_end():
            self.proc.stdout.close()


class Client:
    """A line-oriented TCP client with timeouts everywhere."""

    def __init__(self, port, host="127.0.0.1"):
        self.sock = socket.create_connection((host, port), timeout=IO_TIMEOUT)
        self.sock.settimeout(IO_TIMEOUT)
        self.buf = b""
        self.name = None

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send(self, *lines):
        """Send text lines, each terminated with ``\\n``."""
        self.sendraw(b"".join(line.encode() + b"\n" for line in lines))

    def sendraw(self, data):
        self.sock.sendall(data)

    def read_line(self, timeout=IO_TIMEOUT):
        """The next line without its ``\\n``; AssertionError on timeout or EOF."""
        raw = self.read_raw_line(timeout)
        return raw.decode("utf-8")

    def read_raw_line(self, timeout=IO_TIMEOUT):
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no line within %.1f s (have %r)" % (timeout, self.buf))
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not data:
                raise AssertionError("connection closed (have %r)" % self.buf)
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def read_lines(self, n, timeout=IO_TIMEOUT):
        return [self.read_line(timeout) for _ in range(n)]

    def expect(self, *lines):
        got = self.read_lines(len(lines))
        if got != list(lines):
            raise AssertionError("expected %r, got %r" % (list(lines), got))

    def lines_until(self, wanted):
        """The lines that come before ``wanted``, which must come."""
        lines = []
        while True:
            line = self.read_line()
            if line == wanted:
                return lines
            lines.append(line)

    def login(self, name):
        self.send("LOGIN " + name)
        self.expect("OK")
        self.name = name
        return self

    def barrier(self):
        """Lines that arrive before the answers to a ``WHO`` and a ``PING``.

        The broker answers ``WHO`` after everything it routed to us before,
        on the same link, and the worker runs the ``PING`` only once that
        answer is in: so when ``PONG`` comes, all of it has arrived. No
        sleeping and hoping. (A DM to oneself would not do: the worker
        delivers a DM to a local user without asking the broker.)
        """
        self.send("WHO", "PING")
        before = self.lines_until("PONG")
        if before and before[-1] == "ERR not-logged-in":
            before.pop()
        while before and before[-1].startswith("USER "):
            before.pop()
        return before

    def expect_nothing_more(self):
        extra = self.barrier()
        if extra:
            raise AssertionError("unexpected lines: %r" % extra)

    def expect_closed(self, timeout=IO_TIMEOUT):
        """Read until EOF; return the lines received before it."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("connection not closed (have %r)" % self.buf)
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except ConnectionResetError:
                data = b""
            if not data:
                lines = self.buf.split(b"\n")
                self.buf = b""
                return [l.decode("utf-8") for l in lines if l]
            self.buf += data


class _Timeout(Exception):
    pass


class TestCase(unittest.TestCase):
    """Adds a per-test alarm, so that no test can hang the suite."""

    timeout = TEST_TIMEOUT

    def setUp(self):
        super().setUp()
        if hasattr(signal, "SIGALRM"):
            def on_alarm(signum, frame):
                raise _Timeout("test exceeded %d s" % self.timeout)
            old = signal.signal(signal.SIGALRM, on_alarm)
            signal.alarm(self.timeout)
            self.addCleanup(signal.signal, signal.SIGALRM, old)
            self.addCleanup(signal.alarm, 0)

    def server(self, *args, **kwargs):
        """Start a server that is killed, tree and all, when the test ends."""
        s = Server(*args, **kwargs)
        self.addCleanup(s.kill)
        s.start()
        return s

    def client(self, server, name=None):
        c = server.client(name)
        self.addCleanup(c.close)
        return c
