"""What the tools and the tests share: a throw-away Redis on loopback.

Cluster mode needs a real ``redis-server`` (or ``valkey-server``). The tools
(``cluster.py``, ``stress.py --spawn-cluster``, the chaos run) and the tests
start one the same way: on a free loopback port, in its own session, with no
persistence (``--save '' --appendonly no``), killed at the end.
"""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

REDIS_PROGRAMS = ("redis-server", "valkey-server")
REDIS_HINT = ("redis-server not found: install it to run the cluster "
              "(Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis)")


def redis_program():
    """The path of ``redis-server`` or ``valkey-server``, or None."""
    for name in REDIS_PROGRAMS:
        path = shutil.which(name)
        if path:
            return path
    return None


def free_port(host="127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class RedisServer:
    """``redis-server`` on a free loopback port: ``with RedisServer() as r:``.

    :meth:`restart` kills it and starts it again, empty, on the same port
    (what a Redis without persistence does after a crash).
    """

    def __init__(self, port=None, password=None):
        self.program = redis_program()
        if self.program is None:
            raise RuntimeError(REDIS_HINT)
        self.port = port or free_port()
        self.password = password
        self.proc = None
        self.dir = tempfile.mkdtemp(prefix="chat-redis-")

    @property
    def url(self):
        auth = ":%s@" % self.password if self.password else ""
        return "redis://%s127.0.0.1:%d/0" % (auth, self.port)

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
        need = data.index(b"\r\n") + 2 + max(size, 0) + 2
        while len(data) < need:
            chunk = sock.recv(65536)
            if not chunk:
                raise OSError("redis closed the connection")
            data += chunk
    return data
