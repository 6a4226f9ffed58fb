"""What the tests share, in one place: the real server as a subprocess and
line-oriented clients (both from ``scripts/harness.py``, which the tools use
too, re-exported here), and the helpers of more than one test file.

Every test file imports this module first: it is the one place that puts
the repository on ``sys.path`` (``chatlib``, ``broker``, ``worker``, and the
tools as the package ``scripts``: ``scripts.harness``, ``scripts.fuzz``...). So the tests
run from anywhere: ``python3 -m unittest discover -s tests`` at the top of a
clone, or ``-s`` with the path of this folder from elsewhere.

Every server runs in a fresh session (its own process group), so a test can
find and kill the whole process tree it started, including processes a
``forkserver`` started, and check that none is left over. Every blocking call
has a timeout, and :class:`TestCase` adds a per-test alarm on top.
"""

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_TIMEOUT = 60           # seconds any single test may take
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# The server, the client and /proc: shared with the tools, re-exported to the tests.
from scripts.procfs import (process_role, session_pids, socket_inodes, stat,  # noqa: E402,F401
                    tcp_sockets, usage)
from scripts.harness import (BROKER, IO_TIMEOUT, REDIS_HINT, Client, RedisServer,  # noqa: E402,F401
                     Server, free_port, receive, redis_program, self_signed, start_cluster)
from scripts.tlsclient import client_context  # noqa: E402

START_METHODS = ["fork", "spawn", "forkserver"] if sys.platform != "win32" else ["spawn"]


def per_start_method(namespace, base):
    """Replace test class ``base`` in a module's ``namespace`` with one
    subclass per start method, named ``<base>_<method>``."""
    for method in START_METHODS:
        name = "%s_%s" % (base.__name__, method)
        # Of the test module, not of this one: its setUpModule and
        # tearDownModule must frame these classes too.
        namespace[name] = type(name, (base,), {"start_method": method,
                                               "__module__": base.__module__})
    del namespace[base.__name__]


def requires_redis(cls):
    """Cluster tests need a real ``redis-server``: without one they skip,
    saying how to get it; under ``CI=true`` they run, and fail."""
    if redis_program() is None and os.environ.get("CI") != "true":
        return unittest.skip(REDIS_HINT)(cls)
    return cls


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
        return self.launched(Server(*args, **kwargs)).wait_ready()

    def launched(self, server):
        """``server`` (a :class:`Server` not started yet) launched, not yet
        listening; killed, tree and all, when the test ends."""
        self.addCleanup(server.kill)
        return server.launch()

    def client(self, server, name=None):
        c = server.client(name)
        self.addCleanup(c.close)
        return c

    def tmpdir(self, purpose="test"):
        """A new directory, ``chat-PURPOSE-...``, removed with all in it when
        the test ends."""
        path = tempfile.mkdtemp(prefix="chat-%s-" % purpose)
        self.addCleanup(shutil.rmtree, path, True)
        return path


class UnitTestCase(TestCase):
    """A unit test: code in this process alone, with no server, no Redis and
    no network (a socket pair at most). ``python3 tests/unit.py`` runs these
    alone, in seconds."""

    def assert_damage_refused(self, load, good, damages):
        """A state file's loader (``load``, e.g. ``Accounts.from_json``)
        refuses each of ``damages`` (a function that spoils a copy of the
        good object ``good``, and the ValueError's message as a pattern),
        and anything but an object."""
        for damage, message in damages:
            obj = json.loads(json.dumps(good))
            damage(obj)
            with self.assertRaisesRegex(ValueError, message):
                load(obj)
        with self.assertRaisesRegex(ValueError, "not a JSON object"):
            load([])


class SocketClient(Client):
    """:class:`Client` over a socket connected some other way: see
    :func:`bound_client` and :func:`tls_client`."""

    def __init__(self, sock):
        sock.settimeout(IO_TIMEOUT)
        self.sock = sock
        self.buf = b""
        self.name = None


def bound_client(port, source):
    """A :class:`Client` connecting from source address ``source`` (127.0.0.x)."""
    return SocketClient(socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT,
                                                 source_address=(source, 0)))


def control(path, command, timeout=IO_TIMEOUT):
    """One operator command over the control socket at ``path``, as
    ``socat`` would send it: (the answer's lines, its last line)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(command.encode() + b"\n")
        data = b""
        while True:
            lines = data.split(b"\n")
            for k, line in enumerate(lines[:-1]):
                if line == b"OK" or line.startswith(b"ERR"):
                    return [x.decode() for x in lines[:k]], line.decode()
            chunk = sock.recv(65536)
            if not chunk:
                raise AssertionError("control socket closed after %r" % data[-200:])
            data += chunk


def tls_client(port, context=None):
    """A :class:`Client` over TLS; the certificate is checked only if
    ``context`` checks it."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
    return SocketClient((context or client_context()).wrap_socket(
        raw, server_hostname="localhost"))


def run_to_exit(*command, cwd=ROOT, env=None, timeout=15):
    """Run ``command``, expected to exit by itself, in a session of its own:
    ``(status, stdout, stderr)``, as text. ``env`` is added to this
    process's environment (as for :class:`Server`). Past ``timeout`` its
    whole session is killed, and the test fails."""
    proc = subprocess.Popen(command, cwd=cwd, env=dict(os.environ, **(env or {})),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError("%s did not exit within %.0f s" % (" ".join(command), timeout))
    return proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


def kill_and_replace(server, roles, within):
    """SIGKILL ``server``'s processes titled ``roles``, one right after the
    other, and wait (``within`` seconds each) until each has a replacement;
    the new pids."""
    old = server.roles()
    for role in roles:
        os.kill(old[role], signal.SIGKILL)
    return [server.replacement(role, old[role], within) for role in roles]


def wait_stopped(pids, within=IO_TIMEOUT):
    """Wait until each process of ``pids`` is stopped (after a SIGSTOP: ``T``
    in /proc) or gone."""
    deadline = time.monotonic() + within
    while not all((stat(pid) or [b"T"])[0] in (b"T", b"t") for pid in pids):
        if time.monotonic() > deadline:
            raise AssertionError("not all stopped within %.0f s: %s" % (within, pids))
        time.sleep(0.001)


def served_once_free(make, refusal, within=IO_TIMEOUT):
    """A connection ``make()`` that the server serves (a PING answered), once
    it no longer refuses one with the line ``refusal``. A close reaches the
    acceptor a moment after the client closed (a note from its worker):
    polled, with a deadline."""
    deadline = time.monotonic() + within
    while True:
        c = make()
        c.send("PING")
        line = c.read_line()
        if line == "PONG":
            return c
        if line != refusal:
            raise AssertionError("%r: neither PONG nor %r" % (line, refusal))
        if time.monotonic() > deadline:
            raise AssertionError("still %r %.0f s after a client left" % (refusal, within))
        time.sleep(0.05)


def wait_line(client, wanted, within):
    """Read until the line ``wanted`` comes, within ``within`` seconds in
    all; the lines before it."""
    deadline = time.monotonic() + within
    lines = []
    while True:
        line = client.read_line(max(0.01, deadline - time.monotonic()))
        if line == wanted:
            return lines
        lines.append(line)


def wait_until(check, within=IO_TIMEOUT, what="the condition"):
    """Call ``check`` every 0.1 s until it is true; AssertionError after
    ``within`` seconds. For what the server settles by itself (a ban
    reaching every node, a heartbeat's figures), not for a reply."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("%s did not hold within %.0f s" % (what, within))
        time.sleep(0.1)


def said(client, line):
    """What ``client`` gets back for ``line``, up to the PONG of a PING
    sent after it."""
    client.send(line, "PING")
    return client.lines_until("PONG")


def read_until_eof(client, limit=64 << 20, timeout=IO_TIMEOUT, reset_ok=True):
    """All the bytes ``client`` gets until the server closes it, at most
    ``limit`` (no giant assertion messages). A reset ends it as a close
    does or, without ``reset_ok``, fails: a reset can cost a client the
    lines before it (``nc`` shows none)."""
    data = client.buf
    client.buf = b""
    deadline = time.monotonic() + timeout
    while len(data) <= limit:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError("connection not closed after %d bytes" % len(data))
        client.sock.settimeout(left)
        try:
            chunk = client.sock.recv(1 << 20)
        except socket.timeout:
            continue
        except ConnectionResetError:
            if not reset_ok:
                raise AssertionError("connection reset (after %r)" % data[-300:])
            chunk = b""
        if not chunk:
            return data
        data += chunk
    raise AssertionError("more than %d bytes and still open" % limit)


def example_session(naman, yudi, third):
    """The README's example session, played by three logged-in or fresh
    clients (Naman and Yudi logged in, ``third`` not), wherever they are:
    one server, TLS, or nodes of a cluster."""
    naman.send("MSG hi everyone!", "MSG how are you?")
    yudi.expect("MSG Naman hi everyone!", "MSG Naman how are you?")
    naman.expect_nothing_more()        # no echo of one's own messages
    yudi.send("MSG hello Naman!")
    yudi.send("WHO")
    yudi.expect("USER Naman", "USER Yudi")
    yudi.send("DM Naman secret message")
    yudi.send("PING")
    yudi.expect("PONG")
    yudi.close()
    naman.expect("MSG Yudi hello Naman!", "DM Yudi secret message",
                 "INFO Yudi disconnected")
    for name in ("Naman", "naman"):
        third.send("LOGIN " + name)
        third.expect("ERR username-taken")


def chat_among(users):
    """Every logged-in user of ``users`` sees all the others in ``WHO``, gets
    each one's ``MSG`` once, and a ``DM`` from the one before it (typed in
    upper case): wherever each of them is connected."""
    names = [u.name for u in users]
    for u in users:
        u.send("WHO")
        u.expect(*["USER " + n for n in names])
    for u in users:
        u.send("MSG from %s" % u.name)
    for u in users:
        got = [u.read_line() for _ in range(len(users) - 1)]
        assert sorted(got) == sorted("MSG %s from %s" % (n, n) for n in names
                                     if n != u.name), got
    for i, u in enumerate(users):
        u.send("DM %s ring %d" % (names[(i + 1) % len(names)].upper(), i))
    for i, u in enumerate(users):
        u.expect("DM %s ring %d" % (names[i - 1], (i - 1) % len(names)))


class FaultProxy:
    """A TCP proxy that injects faults between a node and Redis: pass, stall, cut.

    Partitions made real without root: the node talks to the proxy's port,
    the proxy to Redis. ``stall()`` stops forwarding both ways but keeps
    every connection open (a network that drops packets); ``cut()`` closes
    every connection and refuses new ones (a peer that is gone);
    ``restore()`` passes again; ``move(port)`` cuts every connection and
    sends new ones to another server (a failover behind one address). One
    thread accepts, one thread per direction per connection copies.
    """

    def __init__(self, target_port, target_host="127.0.0.1"):
        self.target = (target_host, target_port)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.mode = "pass"
        self.lock = threading.Lock()
        self.pairs = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self):
        return "redis://127.0.0.1:%d/0" % self.port

    def stall(self):
        self.mode = "stall"

    def cut(self):
        with self.lock:
            self.mode = "cut"
            pairs, self.pairs = self.pairs, []
        for pair in pairs:
            for sock in pair:
                _close(sock)

    def restore(self):
        self.mode = "pass"

    def move(self, target_port, target_host="127.0.0.1"):
        self.target = (target_host, target_port)
        self.cut()
        self.restore()

    def close(self):
        self.closed = True
        self.cut()
        _close(self.listener)

    def _accept(self):
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.mode == "cut":
                _close(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=2)
            except OSError:
                _close(client)
                continue
            with self.lock:
                self.pairs.append((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src, dst):
        while not self.closed:
            if self.mode == "stall":
                select.select([], [], [], 0.02)
                continue
            try:
                ready, _, _ = select.select([src], [], [], 0.05)
                if not ready:
                    continue
                if self.mode == "stall":
                    continue
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
            except (OSError, ValueError):
                break
        _close(src)
        _close(dst)


def _close(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
