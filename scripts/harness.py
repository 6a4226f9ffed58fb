"""What the tools and the tests share: servers on loopback, and a line client.

* :class:`Server`: ``python broker.py`` (or any command) in a session of its
  own, its output read by a thread; :meth:`Server.start` waits for its
  ``listening on`` line, :meth:`Server.kill` kills the whole session (which
  also holds the processes a ``forkserver`` started).
* :class:`RedisServer`: a throw-away ``redis-server`` on a free loopback port,
  with no persistence (``--save '' --appendonly no``).
* :func:`start_cluster`: a Redis and N nodes sharing it, one chat.
* :class:`Client`: a blocking line client with a timeout on every read,
  from a chosen source address or over TLS if asked.
* :func:`self_signed`: a throw-away certificate for a TLS server
  (``Server(tls=...)``, ``start_cluster(tls=...)``), made with ``openssl``.

The tools (stress, chaos, fuzz, compare, cluster) and ``tests/support.py``
import this module; it imports nothing of the tests.
"""

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from .procfs import process_role, session_pids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BROKER = os.path.join(ROOT, "broker.py")
IO_TIMEOUT = 5.0            # seconds any single read may wait
LISTENING = re.compile(r"listening on [^ ]+:(\d+)")
TLS_LISTENING = re.compile(r"[^ ]+:(\d+) \(TLS\)")
REDIS_PROGRAMS = ("redis-server", "valkey-server")
REDIS_HINT = ("redis-server not found: install it to run the cluster "
              "(Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis)")
OPENSSL_HINT = ("openssl not found: it makes the throw-away TLS certificate "
                "(Debian/Ubuntu: apt-get install openssl; macOS: brew install openssl)")


class StartError(AssertionError):
    """A server did not come up (an AssertionError, as the tests expect)."""


def redis_program():
    """The path of ``redis-server`` or ``valkey-server``, or None."""
    for name in REDIS_PROGRAMS:
        path = shutil.which(name)
        if path:
            return path
    return None


def free_port(host="127.0.0.1", low=20000, high=32000):
    """A free port below the ephemeral range, so that no client connection
    (nor a connection to itself) can take it as a source port while its
    server restarts on it."""
    for _ in range(200):
        port = random.randrange(low, high)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in %d-%d" % (low, high))


def percentile(ordered, q):
    """Nearest-rank percentile of a sorted sequence (None if empty)."""
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.999999) - 1))]


def self_signed(directory, name="server", kind="ec"):
    """A self-signed certificate for CN=localhost, valid two days, and its
    key, made in ``directory``: ``(cert path, key path)``. ``kind``: ``ec``
    (ECDSA P-256) or ``rsa`` (RSA-2048). RuntimeError (saying what to
    install) without ``openssl``."""
    program = shutil.which("openssl")
    if program is None:
        raise RuntimeError(OPENSSL_HINT)
    cert = os.path.join(directory, name + ".pem")
    key = os.path.join(directory, name + ".key")
    newkey = ["-newkey", "rsa:2048"] if kind == "rsa" else [
        "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
    proc = subprocess.run([program, "req", "-x509"] + newkey + [
                           "-nodes", "-keyout", key, "-out", cert, "-days", "2",
                           "-subj", "/CN=localhost"],
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError("openssl could not make a certificate: "
                           + proc.stderr.decode(errors="replace").strip()[-300:])
    return cert, key


def _die_with_parent():
    """In a server, before exec: if the tool that started it is SIGKILLed
    (no ``finally`` runs then), the server gets SIGKILL too."""
    import ctypes
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)      # PR_SET_PDEATHSIG


class Server:
    """``python broker.py`` on a free port; ``with Server(...) as s:``.

    ``broker``: another tree's ``broker.py`` (run from its folder). With
    ``command`` it runs that command with exactly ``args`` instead.
    ``die_with_parent`` (Linux) makes the server die with the tool.

    ``tls=(cert, key)`` adds a TLS port (``tls_port``, 0: a free one);
    with ``tls_only`` too, the TLS port is its only one and ``port`` names
    it. Once it listens, :attr:`port` is its first port and :attr:`tls_port`
    its TLS port (None without TLS), both from its ``listening on`` line.
    """

    def __init__(self, *args, workers=2, start_method=None, idle_timeout=None, env=None,
                 host="127.0.0.1", port=0, command=None, die_with_parent=False,
                 tls=None, tls_port=0, tls_only=False, broker=BROKER):
        self.cwd = os.path.dirname(os.path.abspath(broker))
        if command is None:
            self.command = [sys.executable, broker]
            self.args = ["--host", host]
            if tls and tls_only:
                self.args += ["--tls-only"]
                tls_port = port
            else:
                self.args += ["--port", str(port)]
            if tls:
                self.args += ["--tls-cert", tls[0], "--tls-key", tls[1],
                              "--tls-port", str(tls_port)]
            if workers is not None:
                self.args += ["--workers", str(workers)]
            if start_method:
                self.args += ["--start-method", start_method]
            if idle_timeout is not None:
                self.args += ["--idle-timeout", str(idle_timeout)]
        else:
            self.command, self.args = list(command), []
        self.args += [str(a) for a in args]
        if command is None and broker == BROKER:
            # This tree's server: a control socket and a state directory of
            # its own, not the operator's defaults (a killed server leaves
            # its socket behind), removed when the tool or test exits.
            private = tempfile.mkdtemp(prefix="server-", dir=_private_root())
            for option, path in (("--control", "control.sock"), ("--state-dir", "state")):
                if option not in self.args:
                    self.args += [option, os.path.join(private, path)]
        self.env = dict(os.environ, **(env or {}))
        self.preexec = _die_with_parent if die_with_parent and sys.platform == "linux" else None
        self.proc = None
        self.port = port or None
        self.tls_port = (tls_port or None) if tls else None
        self.log_lines = []
        self._listening = threading.Event()
        self._log_changed = threading.Condition()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.kill()

    def launch(self):
        """Start the process without waiting for it to listen."""
        self._listening.clear()
        self.proc = subprocess.Popen(
            self.command + self.args, cwd=self.cwd, env=self.env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=self.preexec)
        self._log_reader = threading.Thread(target=self._read_log, daemon=True)
        self._log_reader.start()
        return self

    def start(self, timeout=30, connect=False):
        """Launch, and wait for the ``listening on`` line (or, with
        ``connect``, until the known port takes a connection)."""
        self.launch()
        return self.wait_ready(timeout, connect)

    def wait_ready(self, timeout=30, connect=False):
        deadline = time.monotonic() + timeout
        while not self._listening.wait(0 if connect else 0.05):
            if connect:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                    return self
                except OSError:
                    pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.kill()
                raise StartError("server did not start:\n" + self.log()[-3000:])
            time.sleep(0.05 if connect else 0)
        return self

    def _read_log(self):
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._log_changed:
                self.log_lines.append(line)
                self._log_changed.notify_all()
            m = LISTENING.search(line)
            if m and not self._listening.is_set():
                self.port = int(m.group(1))
                tls = TLS_LISTENING.search(line, m.start())
                if tls:
                    self.tls_port = int(tls.group(1))
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

    def titles(self):
        """Process title -> pids, for every process of this server."""
        found = {}
        for pid in self.pids():
            found.setdefault(process_role(pid), []).append(pid)
        return found

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

    def shutdown(self, timeout=10.0):
        """SIGTERM, then kill what is left; the exit status (a text if it
        had to be killed)."""
        code = self.proc.poll()
        if code is None:
            try:
                code = self.stop(timeout=timeout)
            except subprocess.TimeoutExpired:
                code = "killed after %.0f s" % timeout
        self.kill()
        return code

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
            os.killpg(self.proc.pid, signal.SIGKILL)
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

    @property
    def listening(self):
        return self._listening.is_set()

    def relaunch(self):
        """Launch it again on the port it had (after :meth:`kill`)."""
        if "--port" in self.args:
            self.args[self.args.index("--port") + 1] = str(self.port)
        if "--tls-port" in self.args and self.tls_port:
            self.args[self.args.index("--tls-port") + 1] = str(self.tls_port)
        return self.launch()

    def restart(self, timeout=30):
        """Kill it and start it again on the same port."""
        self.kill()
        self.relaunch()
        return self.wait_ready(timeout)


_PRIVATE_ROOT = []


def _private_root():
    """One directory for this process's servers' sockets and state, removed
    at exit."""
    if not _PRIVATE_ROOT:
        import atexit
        _PRIVATE_ROOT.append(tempfile.mkdtemp(prefix="chat-harness-"))
        atexit.register(shutil.rmtree, _PRIVATE_ROOT[0], True)
    return _PRIVATE_ROOT[0]


def lease_left(log_lines):
    """Seconds a node refused at start must wait for its id to be free (a
    node killed a moment ago still holds it), from its log; None if that
    was not why."""
    m = re.search(r"is in use by another live node.*lease runs out in ([\d.]+) s",
                  "\n".join(log_lines))
    return float(m.group(1)) if m else None


class RedisServer:
    """``redis-server`` on a free loopback port: ``with RedisServer() as r:``.

    :meth:`restart` kills it and starts it again, empty, on the same port
    (what a Redis without persistence does after a crash). With ``tls``
    (cert, key) it also listens for TLS, on :attr:`tls_port` (:attr:`tls_url`).
    """

    def __init__(self, port=None, password=None, tls=None, extra_args=()):
        self.program = redis_program()
        self.extra_args = [str(a) for a in extra_args]
        if self.program is None:
            raise RuntimeError(REDIS_HINT)
        self.port = port or free_port()
        self.password = password
        self.tls = tls
        self.tls_port = free_port() if tls else None
        self.proc = None
        self.dir = tempfile.mkdtemp(prefix="chat-redis-")

    @property
    def url(self):
        auth = ":%s@" % self.password if self.password else ""
        return "redis://%s127.0.0.1:%d/0" % (auth, self.port)

    @property
    def tls_url(self):
        auth = ":%s@" % self.password if self.password else ""
        return "rediss://%slocalhost:%d/0" % (auth, self.tls_port)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def start(self, timeout=10.0):
        args = [self.program, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", self.dir,
                "--daemonize", "no", "--loglevel", "warning"]
        if self.password:
            args += ["--requirepass", self.password]
        if self.tls:
            args += ["--tls-port", str(self.tls_port), "--tls-cert-file", self.tls[0],
                     "--tls-key-file", self.tls[1], "--tls-auth-clients", "no"]
        args += self.extra_args
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("redis-server exited with status %s" % self.proc.returncode)
            if self.ping():
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError("redis-server did not answer on port %d" % self.port)

    def command(self, *args, timeout=2.0):
        """Run one command; the raw reply bytes (enough for PING and INFO)."""
        parts = [b"*%d\r\n" % len(args)]
        for a in args:
            a = a if isinstance(a, bytes) else str(a).encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(a), a))
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            if self.password:
                s.sendall(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n"
                          % (len(self.password), self.password.encode()))
                _read_reply(s)
            s.sendall(b"".join(parts))
            return _read_reply(s)

    def ping(self):
        try:
            return self.command("PING", timeout=0.5).startswith(b"+PONG")
        except OSError:
            return False

    def info(self, section):
        """``INFO section`` as a dict of strings."""
        raw = self.command("INFO", section)
        body = raw.split(b"\r\n", 1)[1].decode()
        return dict(line.split(":", 1) for line in body.splitlines()
                    if ":" in line and not line.startswith("#"))

    # What nodes send. INFO commandstats also counts each call a script makes
    # inside (HGET, XADD...): those are not round trips, and are left out.
    NODE_COMMANDS = ("evalsha", "xread", "zrange", "script", "ping", "auth", "select")

    def usage(self):
        """(commands the nodes sent, CPU seconds) so far, from
        ``INFO commandstats`` and ``INFO cpu``."""
        stats = self.info("commandstats")
        calls = sum(int(stats["cmdstat_" + c].split("calls=", 1)[1].split(",", 1)[0])
                    for c in self.NODE_COMMANDS if "cmdstat_" + c in stats)
        cpu = self.info("cpu")
        return calls, float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            self.proc.wait(5)

    def restart(self):
        self.kill()
        return self.start()

    def stop(self):
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def _read_reply(sock):
    """Read one whole reply: enough of RESP for a status, an error or a bulk string."""
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise OSError("redis closed the connection")
        data += chunk
    if data[:1] == b"$":
        size = int(data[1:data.index(b"\r\n")])
        need = data.index(b"\r\n") + 2 + (size + 2 if size >= 0 else 0)   # -1: nil
        while len(data) < need:
            chunk = sock.recv(65536)
            if not chunk:
                raise OSError("redis closed the connection")
            data += chunk
    return data


class Cluster:
    """A Redis and the nodes that share it (see :func:`start_cluster`)."""

    def __init__(self, redis, own_redis):
        self.redis = redis
        self.own_redis = own_redis
        self.nodes = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    @property
    def ports(self):
        return [node.port for node in self.nodes]

    @property
    def tls_ports(self):
        return [node.tls_port for node in self.nodes]

    def stop(self, timeout=10.0):
        """SIGTERM every node (then kill what is left), stop our Redis;
        the nodes' exit statuses."""
        codes = [node.shutdown(timeout) for node in self.nodes if node.proc is not None]
        if self.own_redis:
            self.redis.stop()
        return codes


def start_cluster(n, workers=1, redis=None, extra_args=(), name="chat", base_port=None,
                  die_with_parent=False, timeout=30, tls=None, tls_only=False, broker=BROKER):
    """A RedisServer (unless one is given) and ``n`` nodes on loopback, each
    ``broker.py --redis URL --cluster NAME --node-id nodeK`` with ``workers``
    workers; returns a :class:`Cluster` once every node listens.

    Nodes listen below the ephemeral range (or from ``base_port`` on), so a
    node restarted on its port finds it free. ``tls`` and ``tls_only`` are
    :class:`Server`'s: with ``tls_only`` a node's port is its TLS port, else
    its TLS port is another free one (:attr:`Cluster.tls_ports`); so is
    ``broker``.
    """
    cluster = Cluster(redis or RedisServer(), redis is None)
    try:
        if cluster.own_redis:
            cluster.redis.start()
        for k in range(n):
            port = base_port + k if base_port else free_port()
            tls_port = free_port() if tls and not tls_only else 0
            node = Server("--redis", cluster.redis.url, "--cluster", name,
                          "--node-id", "node%d" % k, *extra_args, workers=workers,
                          port=port, die_with_parent=die_with_parent,
                          tls=tls, tls_port=tls_port, tls_only=tls_only, broker=broker)
            cluster.nodes.append(node.launch())
        for node in cluster.nodes:
            node.wait_ready(timeout)
    except BaseException:
        cluster.stop(timeout=2)
        raise
    return cluster


def receive(sock, deadline, failure, reset_is_eof=True):
    """The next bytes from ``sock``, b"" once it is closed; past ``deadline``
    (monotonic), AssertionError with the message ``failure()``. A reset is
    the close too, unless ``reset_is_eof`` is False: then AssertionError (a
    reset can cost a client the lines before it; ``nc`` shows none)."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(failure())
        sock.settimeout(left)
        try:
            return sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            if not reset_is_eof:
                raise AssertionError("connection reset; before it: " + failure())
            return b""


class Client:
    """A line-oriented TCP client with timeouts everywhere.

    ``source``: the address it connects from (``127.0.0.2`` ...), for the
    per-address limits. ``tls``: an ``ssl.SSLContext``: it speaks TLS, as a
    blocking ``SSLSocket`` (the handshake done here).
    """

    def __init__(self, port, host="127.0.0.1", source=None, tls=None):
        sock = socket.create_connection((host, port), timeout=IO_TIMEOUT,
                                        source_address=(source, 0) if source else None)
        if tls is not None:
            try:
                sock = tls.wrap_socket(sock, server_hostname="localhost")
            except BaseException:
                sock.close()
                raise
        self.sock = sock
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
            data = receive(self.sock, deadline,
                           lambda: "no line within %.1f s (have %r)" % (timeout, self.buf))
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

    def lines_until(self, wanted, timeout=IO_TIMEOUT):
        """The lines that come before ``wanted``, which must come."""
        lines = []
        while True:
            line = self.read_line(timeout)
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

    def read_until_eof(self, timeout=IO_TIMEOUT, limit=64 << 20, reset_is_eof=True):
        """Every byte until the server closes, what was buffered first (see
        :func:`receive` for a reset); AssertionError past ``timeout``, or
        past ``limit`` bytes (no giant assertion messages)."""
        deadline = time.monotonic() + timeout
        parts, size = [self.buf], len(self.buf)
        self.buf = b""
        while size <= limit:
            data = receive(self.sock, deadline, lambda: "connection not closed after %d "
                           "bytes (the last: %r)" % (size, parts[-1][-100:]), reset_is_eof)
            if not data:
                return b"".join(parts)
            parts.append(data)
            size += len(data)
        raise AssertionError("more than %d bytes and still open" % limit)

    def expect_closed(self, timeout=IO_TIMEOUT, reset_is_eof=True):
        """Read until EOF; return the lines received before it."""
        data = self.read_until_eof(timeout, reset_is_eof=reset_is_eof)
        return [line.decode("utf-8") for line in data.split(b"\n") if line]
