"""Running it as a service: statistics, signals, sd_notify, --log-file,
--version and ``pip install``.

Black-box like the other tests: the real server in its own session, talked to
over TCP, its log read line by line. Nothing sleeps and hopes: every wait is
for a log line, a datagram or a file line, with a deadline.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import unittest

from support import (ROOT, BROKER, IO_TIMEOUT, START_METHODS, Client, Server, TestCase,
                     UnitTestCase, chat_among, control, process_role, run_to_exit, wait_stopped)

import chatlib
from chatlib.supervisor import notify

WAIT = 15.0        # generous: two cores, other suites running at once


def wait_file_line(path, pattern, timeout=WAIT):
    """Poll the file ``path`` until a line matches ``pattern``; the match."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    m = re.search(pattern, line)
                    if m:
                        return m
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            content = "(no file)"
            if os.path.exists(path):
                with open(path, encoding="utf-8", errors="replace") as f:
                    content = f.read()
            raise AssertionError("no line matching %r in %s:\n%s" % (pattern, path, content))
        time.sleep(0.05)


def login_ping(port):
    with Client(port) as c:
        c.send("LOGIN ops-check", "PING")
        c.expect("OK", "PONG")


class CommandServer(Server):
    """A server started with any command line (``chat-server``) from any
    directory, instead of ``python broker.py``."""

    def __init__(self, command, *args, cwd=ROOT, **kwargs):
        super().__init__(*args, **kwargs)
        self.command = list(command)
        self.cwd = cwd


class StatsAndSignalsTest(TestCase):
    def test_stats_interval_line_has_the_counts(self):
        s = self.server("--stats-interval", "0.3", workers=2)
        ada = self.client(s, "ada")
        bob = self.client(s, "bob")
        ada.send(*["MSG m%d" % k for k in range(10)])
        self.assertEqual(ada.barrier(), [])
        self.assertEqual(bob.read_lines(10), ["MSG ada m%d" % k for k in range(10)])
        # In: "LOGIN ada\n" + "LOGIN bob\n" + 10 x "MSG mK\n" + "WHO\nPING\n".
        # Out: "OK\n" twice, "USER ada\nUSER bob\nPONG\n", 10 x "MSG ada mK\n".
        bytes_in = 10 + 10 + 10 * 7 + 9
        bytes_out = 3 + 3 + 23 + 10 * 11
        m = s.wait_log(
            r"stats: clients=2 users=2 per-worker=\[(\d+),(\d+)\] "
            r"msgs=10 \(\d+\.\d/s\) deliveries=10 \(\d+\.\d/s\) "
            r"bytes-in=%d bytes-out=%d slow-cuts=0 flood-cuts=0 "
            r"ipc-batches=(\d+) events-per-batch=(\d+\.\d)$" % (bytes_in, bytes_out),
            timeout=WAIT)
        self.assertEqual(int(m.group(1)) + int(m.group(2)), 2)
        self.assertGreater(int(m.group(3)), 0)
        self.assertGreater(float(m.group(4)), 0)

    def test_stats_lines_come_at_the_interval_and_not_without_it(self):
        s = self.server("--stats-interval", "0.2", workers=1)
        s.wait_log(r"stats: clients=0 users=0 per-worker=\[0\] msgs=0 ")
        start = len(s.log_lines)
        s.wait_log(r"stats: ", WAIT, start=start)      # and another one after it
        quiet = self.server(workers=1)
        login_ping(quiet.port)
        quiet.stop()
        self.assertTrue(quiet.wait_log_end())
        self.assertNotIn("stats:", quiet.log())

    def test_sigusr1_lists_every_process(self):
        s = self.server(workers=2)
        self.client(s, "ada")
        start = len(s.log_lines)
        s.proc.send_signal(signal.SIGUSR1)
        s.wait_log(r"process worker-1 pid=", WAIT, start=start)
        lines = s.log_lines_from(start)
        self.assertTrue(any(re.search(r"stats: clients=\d users=\d", l) for l in lines), lines)
        procs = {}
        for line in lines:
            m = re.search(r"process (\S+) pid=(\d+) uptime=\d+s(?: restarts=(\d+))?$", line)
            if m:
                procs[m.group(1)] = (int(m.group(2)), m.group(3))
        self.assertEqual(sorted(procs), ["acceptor", "broker", "main", "worker-0", "worker-1"])
        self.assertEqual(procs["main"][0], s.proc.pid)
        # Under fork the session holds exactly these processes.
        self.assertEqual(sorted(pid for pid, _ in procs.values()), sorted(s.pids()))
        for name, (pid, restarts) in procs.items():
            if name != "main":
                self.assertEqual(process_role(pid), "chat-" + name)
                self.assertEqual(restarts, "0")

    def test_sigusr1_to_every_process_kills_nothing(self):
        """``systemctl kill -s USR1`` signals the whole tree: under forkserver
        the children and multiprocessing's helpers must survive it."""
        s = self.server(workers=2, start_method="forkserver")
        c = self.client(s, "ada")
        pids = sorted(s.pids())
        start = len(s.log_lines)
        os.killpg(s.proc.pid, signal.SIGUSR1)
        s.wait_log(r"process worker-1 pid=", WAIT, start=start)
        c.send("PING")
        c.expect("PONG")
        self.assertEqual(sorted(s.pids()), pids)
        self.assertNotIn("ERROR", "\n".join(s.log_lines_from(start)))
        self.assertEqual(s.stop(), 0)

    def test_sigterm_to_every_process_is_a_clean_stop(self):
        """``KillMode=control-group`` or ``kill -TERM -- -PGID``: the children
        leave the stopping to the supervisor, under every start method, so
        every client still gets ``ERR server-shutdown``."""
        for method in START_METHODS:
            with self.subTest(start_method=method):
                s = self.server(workers=2, start_method=method)
                clients = [self.client(s, "u%d" % k) for k in range(4)]
                os.killpg(s.proc.pid, signal.SIGTERM)
                for c in clients:
                    lines = c.expect_closed(timeout=WAIT)
                    # PROTOCOL.md: at shutdown, INFO lines about other users
                    # may precede ERR server-shutdown (a worker that stopped
                    # first); nothing follows it.
                    self.assertEqual(lines[-1:], ["ERR server-shutdown"], lines)
                    others = {"INFO %s disconnected" % o.name for o in clients if o is not c}
                    self.assertLessEqual(set(lines[:-1]), others, lines)
                self.assertEqual(s.proc.wait(WAIT), 0)
                self.assertTrue(s.wait_log_end(WAIT))
                self.assertNotRegex(s.log(), r"ERROR|WARNING|Traceback")

    def test_sighup_without_a_log_file_says_there_is_nothing_to_reopen(self):
        s = self.server(workers=1)
        c = self.client(s, "ada")
        pids = sorted(s.pids())
        start = len(s.log_lines)
        s.proc.send_signal(signal.SIGHUP)
        m = s.wait_log(r"main\[%d\] received SIGHUP: (.*)$" % s.proc.pid, WAIT, start=start)
        self.assertEqual(m.group(1), "nothing to do (logging to stderr, no TLS certificate)")
        c.send("PING")
        c.expect("PONG")
        self.assertEqual(sorted(s.pids()), pids)
        self.assertNotIn("log file", "\n".join(s.log_lines_from(start)))

    def test_sigusr1_counts_restarts(self):
        s = self.server(workers=2)
        first = int(s.wait_log(r"started worker-1 \(pid (\d+)\)").group(1))
        start = len(s.log_lines)
        os.kill(first, signal.SIGKILL)
        second = int(s.wait_log(r"started worker-1 \(pid (\d+)\)", WAIT, start=start).group(1))
        start = len(s.log_lines)
        s.proc.send_signal(signal.SIGUSR1)
        m = s.wait_log(r"process worker-1 pid=(\d+) uptime=\d+s restarts=(\d+)$", WAIT, start=start)
        self.assertEqual((int(m.group(1)), m.group(2)), (second, "1"))
        m = s.wait_log(r"process worker-0 pid=\d+ uptime=\d+s restarts=(\d+)$", WAIT, start=start)
        self.assertEqual(m.group(1), "0")


class PauseTest(TestCase):
    """The whole server stopped and resumed: Ctrl-Z and ``fg`` in a terminal,
    ``systemctl freeze`` and ``thaw``. Its processes resume in any order; the
    worst is the supervisor first, finding every child silent for longer
    than --heartbeat-timeout while they were stopped with it."""

    HEARTBEAT_TIMEOUT = 2.0
    FROZEN = 3.0               # longer than the heartbeat timeout

    def freeze(self, s):
        """SIGSTOP every process of ``s`` (as Ctrl-Z does), and wait until
        all are stopped; their pids."""
        pids = sorted(s.pids())
        os.killpg(s.proc.pid, signal.SIGSTOP)
        wait_stopped(pids, WAIT)
        return pids

    def resume_main_first(self, s):
        """SIGCONT the main process alone, and wait for its first turn: it
        either forgives the pause or blames its children; the log index."""
        start = len(s.log_lines)
        os.kill(s.proc.pid, signal.SIGCONT)
        s.wait_log(r"did not run for|missed its heartbeats", WAIT, start=start)
        return start

    def test_supervisor_resumed_before_its_children_kills_none(self):
        s = self.server("--heartbeat-timeout", self.HEARTBEAT_TIMEOUT, workers=2)
        users = [self.client(s, "user%d" % k) for k in range(6)]
        pids = self.freeze(s)
        time.sleep(self.FROZEN)            # the pause itself
        start = self.resume_main_first(s)
        # The children stay stopped a moment longer while the supervisor runs.
        time.sleep(0.5)
        os.killpg(s.proc.pid, signal.SIGCONT)
        resumed = time.monotonic()
        m = s.wait_log(r"WARNING +main\[\d+\] the supervisor did not run for ([\d.]+) s "
                       r"\(stopped or suspended\): heartbeats are counted from now$",
                       start=start)
        self.assertGreaterEqual(float(m.group(1)), self.FROZEN)
        chat_among(users)
        # A child is blamed only once a whole timeout has passed since the
        # supervisor ran again: let that pass, then nothing may have died.
        time.sleep(max(0.0, resumed + self.HEARTBEAT_TIMEOUT + 0.5 - time.monotonic()))
        chat_among(users)
        self.assertEqual(sorted(s.pids()), pids)
        self.assertNotRegex("\n".join(s.log_lines_from(start)),
                            r"missed its heartbeats|ERROR|Traceback")

    def test_a_child_still_stopped_after_the_pause_is_replaced(self):
        """The pause is forgiven, not a hang: a child that stays stopped is
        killed one timeout after the supervisor ran again, and the log says
        how long it was really silent, the pause included."""
        s = self.server("--heartbeat-timeout", self.HEARTBEAT_TIMEOUT, workers=1)
        worker = s.roles()["chat-worker-0"]
        self.freeze(s)
        time.sleep(self.FROZEN)
        start = self.resume_main_first(s)
        m = s.wait_log(r"worker-0 \(pid %d\) missed its heartbeats for ([\d.]+) s; killing it"
                       % worker, WAIT, start=start)
        self.assertGreaterEqual(float(m.group(1)), self.FROZEN + self.HEARTBEAT_TIMEOUT)
        new = s.replacement("chat-worker-0", worker, WAIT)
        self.assertNotEqual(new, worker)


@unittest.skipUnless(hasattr(os, "SCHED_BATCH"), "SCHED_BATCH is Linux's")
class SchedulingTest(TestCase):
    """The children run as SCHED_BATCH (see chatlib.service.prefer_batching)
    unless the operator started the server under another policy."""

    def setUp(self):
        super().setUp()
        probe = subprocess.run([sys.executable, "-c", "import os; os.sched_setscheduler("
                                "0, os.SCHED_BATCH, os.sched_param(0))"], timeout=WAIT)
        if probe.returncode:
            self.skipTest("this machine refuses SCHED_BATCH (a seccomp policy?)")

    def policies(self, s):
        return {process_role(pid): os.sched_getscheduler(pid) for pid in s.pids()}

    def test_children_batch_the_main_process_does_not(self):
        s = self.server(workers=2)
        self.client(s, "ada")
        policies = self.policies(s)
        self.assertEqual(os.sched_getscheduler(s.proc.pid), os.SCHED_OTHER)
        for role in ("chat-acceptor", "chat-broker", "chat-worker-0", "chat-worker-1"):
            self.assertEqual(policies[role], os.SCHED_BATCH, policies)

    @unittest.skipUnless(shutil.which("chrt"), "needs chrt(1)")
    def test_an_operators_policy_is_kept(self):
        if subprocess.run(["chrt", "--idle", "0", "true"], timeout=WAIT).returncode:
            self.skipTest("chrt cannot set SCHED_IDLE here")
        s = self.launched(CommandServer(["chrt", "--idle", "0", sys.executable, BROKER],
                                        workers=2)).wait_ready()
        self.client(s, "ada")
        policies = self.policies(s)
        for role in ("chat-acceptor", "chat-broker", "chat-worker-0", "chat-worker-1"):
            self.assertEqual(policies[role], os.SCHED_IDLE, policies)


class NotifyTest(TestCase):
    """A fake service manager: a Unix datagram socket in $NOTIFY_SOCKET."""

    def notify_socket(self, abstract=False):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        if abstract:
            name = "chat-test-notify-%d-%d" % (os.getpid(), time.monotonic_ns())
            sock.bind("\0" + name)
            return sock, "@" + name
        tmp = self.tmpdir("notify")
        path = os.path.join(tmp, "notify")
        sock.bind(path)
        return sock, path

    def receive(self, sock, timeout=WAIT):
        sock.settimeout(timeout)
        try:
            return sock.recv(4096).decode()
        except socket.timeout:
            raise AssertionError("no sd_notify message within %.0f s" % timeout)

    def test_ready_status_and_stopping(self):
        sock, path = self.notify_socket()
        s = self.launched(Server("--stats-interval", "0.2", workers=2,
                                 env={"NOTIFY_SOCKET": path}))
        first = self.receive(sock)
        # READY=1 comes only once every process is up: a login works at once.
        self.assertIn("READY=1", first.split("\n"))
        m = re.search(r"^STATUS=listening on 127\.0\.0\.1:(\d+)$", first, re.M)
        self.assertIsNotNone(m, first)
        port = int(m.group(1))
        with Client(port) as c:
            c.login("ada")
            # The statistics follow as STATUS= lines.
            while True:
                message = self.receive(sock)
                self.assertNotIn("READY=1", message)
                if message == "STATUS=1 clients, 1 users":
                    break
                self.assertRegex(message, r"^STATUS=\d+ clients, \d+ users$")
            s.proc.send_signal(signal.SIGTERM)
            self.assertEqual(c.expect_closed(), ["ERR server-shutdown"])
        while True:
            message = self.receive(sock)
            if "STOPPING=1" in message.split("\n"):
                break
            self.assertRegex(message, r"^STATUS=")
        self.assertEqual(s.proc.wait(IO_TIMEOUT * 2), 0)
        s.wait_log(r"listening on 127\.0\.0\.1:%d$" % port)

    def test_reloading_around_an_upgrade(self):
        """``systemctl reload`` is ``ctl upgrade``: RELOADING=1 with the
        monotonic clock when it begins, READY=1 when it is done."""
        sock, path = self.notify_socket()
        s = self.launched(Server(workers=1, env={"NOTIFY_SOCKET": path}))
        self.assertIn("READY=1", self.receive(sock).split("\n"))
        control_path = s.args[s.args.index("--control") + 1]
        before = time.monotonic_ns() // 1000
        lines, last = control(control_path, "upgrade", timeout=WAIT * 2)
        self.assertEqual(last, "OK", lines)
        reloading = self.receive(sock).split("\n")
        self.assertEqual(reloading[0], "RELOADING=1")
        self.assertGreaterEqual(int(reloading[1].split("=")[1]), before)
        self.assertTrue(reloading[1].startswith("MONOTONIC_USEC="), reloading)
        done = self.receive(sock).split("\n")
        self.assertEqual(done[0], "READY=1")
        self.assertRegex(done[1], r"^STATUS=upgraded from \S+ to \S+ in ")

    def test_ready_only_after_listening_even_when_slow(self):
        """With spawn (slow children) a login right after READY=1 succeeds,
        and READY=1 names the port the log announces."""
        sock, path = self.notify_socket()
        s = self.launched(Server(workers=2, start_method="spawn", env={"NOTIFY_SOCKET": path}))
        message = self.receive(sock)
        self.assertIn("READY=1", message.split("\n"))
        port = int(re.search(r"STATUS=listening on [^:]+:(\d+)", message).group(1))
        login_ping(port)
        # (The log line is written before the datagram is sent; our reader
        # thread may still be on its way to it.)
        s.wait_log(r"listening on 127\.0\.0\.1:%d$" % port)
        self.assertEqual(s.stop(), 0)

    def test_notify_abstract_socket_and_no_socket(self):
        sock, address = self.notify_socket(abstract=True)
        old = os.environ.get("NOTIFY_SOCKET")
        self.addCleanup(lambda: os.environ.__setitem__("NOTIFY_SOCKET", old)
                        if old is not None else os.environ.pop("NOTIFY_SOCKET", None))
        os.environ["NOTIFY_SOCKET"] = address
        self.assertTrue(notify("STATUS=hello"))
        self.assertEqual(self.receive(sock, IO_TIMEOUT), "STATUS=hello")
        del os.environ["NOTIFY_SOCKET"]
        self.assertFalse(notify("READY=1"))


class LogFileTest(TestCase):
    def log_file_server(self, path, start_method=None):
        s = self.launched(Server("--log-file", path, workers=2, start_method=start_method))
        port = int(wait_file_line(path, r"listening on [^ ]+:(\d+)").group(1))
        s.port = port
        return s

    def check_reopen(self, start_method, whole_group):
        tmp = self.tmpdir("log")
        path = os.path.join(tmp, "chat.log")
        s = self.log_file_server(path, start_method)
        c = self.client(s, "before")
        wait_file_line(path, r"worker-\d\[\d+\] before logged in from ")
        pids = sorted(s.pids())
        os.rename(path, path + ".1")
        if whole_group:          # like `systemctl kill -s HUP` or a hang-up
            os.killpg(s.proc.pid, signal.SIGHUP)
        else:
            s.proc.send_signal(signal.SIGHUP)
        wait_file_line(path, r"main\[%d\] received SIGHUP: log file reopened" % s.proc.pid)
        self.client(s, "after")
        # The worker's line about the new login lands in the new file.
        wait_file_line(path, r"worker-\d\[\d+\] after logged in from ")
        with open(path + ".1") as f:
            old = f.read()
        self.assertNotIn("after", old)
        self.assertNotIn("reopened", old)
        # Nobody died of the signal, no client noticed.
        self.assertEqual(sorted(s.pids()), pids)
        c.send("PING")
        c.expect("PONG")
        self.assertEqual(s.stop(), 0)
        self.assertEqual(s.log(), "", "nothing on stderr with --log-file")
        wait_file_line(path, r"main\[\d+\] stopped")

    def test_sighup_reopens_the_log_file(self):
        self.check_reopen(None, whole_group=False)

    def test_sighup_to_every_process_under_forkserver(self):
        """The forkserver and resource tracker must survive a SIGHUP sent to
        the whole process group, or every child would go with them."""
        self.check_reopen("forkserver", whole_group=True)


class CommandLineTest(TestCase):
    def test_version_names_the_product_however_started(self):
        """The project's name in pyproject.toml, not the program's file."""
        with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
            product = re.search(r'^name = "([^"]+)"$', f.read(), re.M).group(1)
        self.assertEqual(product, "chat-server")
        self.assertRegex(chatlib.__version__, r"^\d+\.\d+\.\d+")
        for command in ([sys.executable, BROKER],):
            with self.subTest(command=command[1:]):
                code, out, err = run_to_exit(*command, "--version", timeout=WAIT)
                self.assertEqual((code, out, err),
                                 (0, "%s %s\n" % (product, chatlib.__version__), ""))

    def test_a_log_file_that_cannot_be_written_is_a_usage_error(self):
        tmp = self.tmpdir("log")
        for path, reason in ((os.path.join(tmp, "missing", "chat.log"), "No such file"),
                             (tmp, "Is a directory")):
            with self.subTest(path=path):
                code, out, err = run_to_exit(sys.executable, BROKER, "--port", "0",
                                             "--log-file", path, timeout=WAIT)
                self.assertEqual(code, 2, err)
                self.assertTrue(err.startswith("usage: broker.py "), err)
                self.assertNotIn("Traceback", err)
                errors = [line for line in err.splitlines() if "error" in line]
                self.assertEqual(len(errors), 1, err)
                self.assertRegex(errors[0], r"^broker\.py: error: --log-file %s: %s"
                                 % (re.escape(path), reason))
                self.assertEqual(out, "")
        self.assertEqual(os.listdir(tmp), [])

    def test_one_version_source(self):
        try:
            import tomllib
        except ImportError:
            self.skipTest("tomllib needs Python 3.11")
        with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
            project = tomllib.load(f)
        self.assertEqual(project["project"]["dynamic"], ["version"])
        self.assertEqual(project["tool"]["setuptools"]["dynamic"]["version"],
                         {"attr": "chatlib.__version__"})
        with open(os.path.join(ROOT, "CHANGELOG.md"), encoding="utf-8") as f:
            changelog = f.read()
        self.assertIn("## [%s]" % chatlib.__version__, changelog)


class ReloadDocumentedTest(UnitTestCase):
    """SIGHUP (reopen the log, reload the certificate) has one way in for a
    service, ``systemctl kill -s HUP chat-server``, and one for a server run
    by hand, ``kill -HUP`` of the main pid; ``systemctl reload`` is an
    upgrade (``ctl upgrade``), the unit's ExecReload=. The README,
    OPERATIONS and the contrib files say the same."""

    RELOAD = "systemctl kill -s HUP chat-server"

    def read(self, *path):
        with open(os.path.join(ROOT, *path), encoding="utf-8") as f:
            return f.read()

    def test_the_unit_reloads_with_an_upgrade(self):
        unit = self.read("contrib", "chat-server.service")
        self.assertIn("ExecReload=/usr/local/bin/chat-server ctl --port 4000 --timeout 60 upgrade",
                      unit.splitlines())
        self.assertIn("ExecStart=/usr/local/bin/chat-server --host 0.0.0.0 --port 4000 \\",
                      unit.splitlines())

    def test_every_document_names_the_same_commands(self):
        readme = self.read("README.md")
        self.assertTrue("--deploy-hook '%s'" % self.RELOAD in readme, "certbot's hook")
        for name, text in (("README.md", readme),
                           ("docs/OPERATIONS.md", self.read("docs", "OPERATIONS.md"))):
            for wanted in (self.RELOAD, "kill -HUP PID"):
                self.assertTrue(wanted in text, "%s does not say %r" % (name, wanted))
            for other in ("pkill", "--signal=HUP", "no `ExecReload=`"):
                self.assertFalse(other in text, "%s still says %r" % (name, other))
        rotate = self.read("contrib", "chat-server.logrotate")
        self.assertRegex(rotate, r"postrotate\n +%s(\.service)? " % re.escape(self.RELOAD))


class InstallTest(TestCase):
    """``pip install`` of the project into a fresh venv gives a ``chat-server``
    that serves, imported from the venv alone, under spawn (the strictest:
    children import ``worker`` and ``broker`` by name)."""

    timeout = 120

    # Files a source distribution needs (a copy, so the build never touches
    # the work tree that other runs share).
    SOURCES = ["pyproject.toml", "README.md", "LICENSE", "broker.py", "worker.py",
               "chatlib", "scripts"]

    def pip_install(self, venv_python, source):
        """Install offline if the environment can build a wheel, else through
        the configured index; skip the test when neither works."""
        base = [sys.executable, "-m", "pip", "--python", venv_python, "install",
                "--no-deps", "--disable-pip-version-check", "--no-input", "-q"]
        # Offline first; then the index (for setuptools), briefly: no
        # network means a skip, not a long wait.
        attempts = [base + ["--no-build-isolation", "--no-index", source],
                    base + ["--timeout", "10", "--retries", "1", source]]
        out = ""
        for command in attempts:
            try:
                proc = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, timeout=40)
            except subprocess.TimeoutExpired:
                out += "\n%s: timed out" % " ".join(command)
                continue
            if proc.returncode == 0:
                return
            out += "\n" + proc.stdout.decode(errors="replace")
        self.skipTest("pip could not build the project here (no setuptools and wheel "
                      "installed, no index reachable?):" + out[-1500:])

    def test_pip_install_gives_working_commands(self):
        try:
            import venv  # noqa: F401
        except ImportError:
            self.skipTest("no venv module")
        pip = subprocess.run([sys.executable, "-m", "pip", "--version"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        m = re.match(rb"pip (\d+)\.(\d+)", pip.stdout)
        if pip.returncode or not m or (int(m.group(1)), int(m.group(2))) < (22, 3):
            self.skipTest("needs pip 22.3 or newer (pip --python)")
        tmp = self.tmpdir("install")
        source = os.path.join(tmp, "src")
        os.mkdir(source)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
        for name in self.SOURCES:
            src = os.path.join(ROOT, name)
            if os.path.isdir(src):
                shutil.copytree(src, os.path.join(source, name), ignore=ignore)
            elif os.path.exists(src):
                shutil.copy2(src, source)
        venv_dir = os.path.join(tmp, "venv")
        # --system-site-packages: an installed setuptools builds offline.
        made = subprocess.run([sys.executable, "-m", "venv", "--without-pip",
                               "--system-site-packages", venv_dir],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
        if made.returncode:
            self.skipTest("python -m venv failed: " + made.stdout.decode(errors="replace"))
        bin_dir = os.path.join(venv_dir, "bin")
        python = os.path.join(bin_dir, "python")
        self.pip_install(python, source)

        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        run = os.path.join(tmp, "run")      # not the clone: nothing imported from it
        os.mkdir(run)
        where = subprocess.run(
            [python, "-c", "import broker, worker, chatlib, chat_tools; "
                           "print(broker.__file__, worker.__file__, chatlib.__file__, "
                           "chatlib.__version__)"],
            cwd=run, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=WAIT)
        self.assertEqual(where.returncode, 0, where.stdout)
        files = where.stdout.decode().split()
        for f in files[:3]:
            self.assertTrue(f.startswith(venv_dir), files)
        self.assertEqual(files[3], chatlib.__version__)

        version = subprocess.run([os.path.join(bin_dir, "chat-server"), "--version"],
                                 cwd=run, env=env, stdout=subprocess.PIPE, timeout=WAIT)
        self.assertEqual(version.stdout.decode(), "chat-server %s\n" % chatlib.__version__)

        # The stress tool's command is there; if the tool is, it imports.
        self.assertTrue(os.access(os.path.join(bin_dir, "chat-stress"), os.X_OK))
        if os.path.exists(os.path.join(source, "scripts", "stress.py")):
            imported = subprocess.run(
                [python, "-c", "from chat_tools.stress import main; assert callable(main)"],
                cwd=run, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                timeout=WAIT)
            self.assertEqual(imported.returncode, 0, imported.stdout)

        # spawn and forkserver children import `worker` and `broker` by name.
        for method in [m for m in START_METHODS if m != "fork"] + ["fork"]:
            with self.subTest(start_method=method):
                s = CommandServer([os.path.join(bin_dir, "chat-server")], workers=2,
                                  start_method=method, cwd=run)
                s.env = env
                self.launched(s).wait_ready(WAIT * 2)
                login_ping(s.port)
                with Client(s.port) as a, Client(s.port) as b:
                    a.login("ada")
                    b.login("bob")
                    a.send("MSG hi")
                    # ops-check's INFO may still be on its way: its close
                    # and bob's login reach the broker in either order.
                    before = b.lines_until("MSG ada hi")
                    self.assertLessEqual(set(before), {"INFO ops-check disconnected"})
                self.assertEqual(s.stop(), 0)

        # `pip install -U` under a running server: `ctl upgrade` loads the
        # package's new files, and its users stay.
        s = CommandServer([os.path.join(bin_dir, "chat-server")], workers=2, cwd=run)
        s.env = env
        self.launched(s).wait_ready(WAIT * 2)
        control = s.args[s.args.index("--control") + 1]
        with Client(s.port) as a, Client(s.port) as b:
            a.login("ada")
            b.login("bob")
            with open(files[2]) as f:
                text = f.read()
            with open(files[2], "w") as f:
                f.write(text.replace(chatlib.__version__, "99.0"))
            upgraded = subprocess.run(
                [os.path.join(bin_dir, "chat-server"), "ctl", "--control", control, "upgrade"],
                cwd=run, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
            self.assertRegex(upgraded.stdout.decode(), r"^upgraded from \S+ to 99\.0 in ")
            a.send("MSG after")
            b.expect("MSG ada after")
        self.assertEqual(s.stop(), 0)


if __name__ == "__main__":
    unittest.main()
