"""The control socket (chatlib/control): the sans-IO session's framing, the
command table, and a real ControlServer in a subprocess running a small loop
like the supervisor's, talked to by raw sockets and by ``ctl``.

The server under test runs :data:`ECHO_SERVER`, whose commands exist for the
tests: ``echo TEXT``, ``fail REASON``, ``lines COUNT SIZE``, ``later TEXT``
(answered a turn later, as a relayed command is) and ``hang`` (never
answered). It stops when its stdin closes, as the tests' cleanup does.
"""

import contextlib
import io
import json
import os
import pwd
import signal
import socket
import stat
import subprocess
import sys
import threading
import unittest
from unittest import mock

from support import BROKER, ROOT, IO_TIMEOUT, SocketClient, TestCase, UnitTestCase, read_until_eof, \
    run_to_exit

from chatlib.control import client, commands
from chatlib.control.server import (MAX_LINE, ControlError, ControlServer, ControlSession,
                                    candidate_paths, default_socket_path, peer_credentials)

ECHO_SERVER = r"""
import json, logging, sys
from multiprocessing.connection import wait
sys.path.insert(0, sys.argv[1])
from chatlib.control import commands
from chatlib.control.server import ControlError, ControlServer

path, options = sys.argv[2], json.loads(sys.argv[3])
logging.basicConfig(filename=options.pop("log"), level=logging.DEBUG,
                    format="%(name)s %(levelname)s %(message)s")
later = []

def on_command(line, reply):
    name, rest = commands.split(line)
    if name == "echo":
        reply([rest])
    elif name == "fail":
        reply([], rest)
    elif name == "lines":
        count, size = map(int, rest.split())
        reply(["x" * size] * count)
    elif name == "later":
        later.append((reply, rest))
    elif name == "hang":
        pass
    else:
        reply([], "unknown-command " + name)

server = ControlServer(path, on_command, logging.getLogger("control"), **options)
try:
    server.open()
except ControlError as exc:
    print(exc, flush=True)
    sys.exit(1)
print("ready", flush=True)
while True:
    due, later[:] = list(later), []
    timeout = 0.01 if server.writing or due else 0.25
    ready = wait(server.waitables() + [sys.stdin], timeout)
    if sys.stdin in ready:
        break
    for obj in ready:
        server.on_ready(obj)
    for reply, text in due:
        reply([text])
    server.flush()
server.close()
"""

# ctl as its own process, as `python3 broker.py ctl` runs it.
CTL = [sys.executable, BROKER, "ctl"]


def session_with(*chunks):
    session = ControlSession()
    for chunk in chunks:
        session.receive(chunk)
    return session


class Session(UnitTestCase):
    """ControlSession: bytes in, command lines out, answers to bytes."""

    def test_a_command_and_its_answer(self):
        session = session_with(b"users\n")
        self.assertEqual(session.next_command(), "users")
        session.answer(["alice 192.0.2.1", "bob 192.0.2.2"])
        self.assertEqual(session.pending_output, b"alice 192.0.2.1\nbob 192.0.2.2\nOK\n")

    def test_an_error_ends_the_answer(self):
        session = session_with(b"kick nobody\n")
        session.next_command()
        session.answer([], "no-such-user nobody is here")
        self.assertEqual(session.pending_output, b"ERR no-such-user nobody is here\n")

    def test_crlf_spaces_and_lines_cut_anywhere(self):
        session = session_with(b"  sta", b"ts  \r", b"\nhe", b"lp\r\n")
        self.assertEqual(session.next_command(), "stats")
        session.answer([])
        self.assertEqual(session.next_command(), "help")

    def test_blank_lines_are_skipped_unanswered(self):
        session = session_with(b"\n\r\n \t \nusers\n\n")
        self.assertEqual(session.next_command(), "users")
        session.answer([])
        self.assertIsNone(session.next_command())
        self.assertEqual(session.pending_output, b"OK\n")

    def test_one_at_a_time_in_order(self):
        session = session_with(b"first\nsecond\n")
        self.assertEqual(session.next_command(), "first")
        self.assertIsNone(session.next_command())       # first still unanswered
        self.assertFalse(session.wants_data)            # nothing more is read meanwhile
        session.answer(["1"])
        self.assertEqual(session.next_command(), "second")
        session.answer([], "nope")
        self.assertEqual(session.pending_output, b"1\nOK\nERR nope\n")
        self.assertTrue(session.wants_data)

    def test_an_answer_without_a_command_is_a_bug(self):
        session = session_with(b"users\n")
        with self.assertRaises(RuntimeError):
            session.answer([])
        session.next_command()
        session.answer([])
        with self.assertRaises(RuntimeError):
            session.answer([])

    def test_answer_lines_cannot_break_the_framing(self):
        session = session_with(b"users\n")
        session.next_command()
        session.answer(["OK", "ERR", "ERR x", "ERRATIC", "OKAY", "two\r\nlines"], "bad\nthing")
        self.assertEqual(session.pending_output,
                         b" OK\n ERR\n ERR x\nERRATIC\nOKAY\ntwolines\nERR badthing\n")

    def test_a_line_of_the_longest_length_is_a_command(self):
        session = session_with(b"echo " + b"x" * (MAX_LINE - 6) + b"\n")
        self.assertEqual(len(session.next_command()), MAX_LINE - 1)

    def test_a_line_too_long_is_refused_before_its_end_comes(self):
        session = session_with(b"x" * (MAX_LINE - 1))
        self.assertIsNone(session.next_command())       # may still end in time
        session.receive(b"x")
        self.assertIsNone(session.next_command())
        self.assertEqual(session.pending_output, b"ERR line-too-long\n")
        self.assertFalse(session.wants_data)
        self.assertEqual(len(session.received), 0)       # nothing of it kept
        session.receive(b"x" * 1000 + b"\nusers\n")      # nothing more taken
        self.assertEqual(len(session.received), 0)
        self.assertIsNone(session.next_command())
        self.assertFalse(session.must_close)             # not before the ERR is sent
        session.sent(len(session.pending_output))
        self.assertTrue(session.must_close)

    def test_a_line_too_long_that_came_whole_is_refused(self):
        session = session_with(b"x" * MAX_LINE + b"\nusers\n")
        self.assertIsNone(session.next_command())
        self.assertEqual(session.pending_output, b"ERR line-too-long\n")

    def test_a_line_too_long_is_refused_in_its_turn(self):
        session = session_with(b"users\n" + b"x" * MAX_LINE)
        self.assertEqual(session.next_command(), "users")
        self.assertEqual(session.pending_output, b"")
        session.answer(["alice"])
        self.assertIsNone(session.next_command())
        self.assertEqual(session.pending_output, b"alice\nOK\nERR line-too-long\n")

    def test_a_line_not_utf8_is_refused_in_its_turn(self):
        session = session_with(b"users\n\xff\xfe\nstats\n")
        self.assertEqual(session.next_command(), "users")
        session.answer([])
        self.assertEqual(session.next_command(), "stats")
        session.answer([])
        self.assertEqual(session.pending_output, b"OK\nERR bad-encoding\nOK\n")

    def test_lines_before_the_end_of_the_stream_are_answered(self):
        session = session_with(b"users\nstats", b"")
        self.assertFalse(session.wants_data)
        self.assertEqual(session.next_command(), "users")
        session.answer([])
        self.assertFalse(session.must_close)
        self.assertEqual(session.next_command(), "stats")   # the unfinished last line
        session.answer([])
        self.assertIsNone(session.next_command())
        session.sent(3)
        self.assertFalse(session.must_close)
        session.sent(3)
        self.assertTrue(session.must_close)

    def test_output_past_the_cap_drops_the_session(self):
        session = ControlSession(max_output=100)
        session.receive(b"a\nb\n")
        session.next_command()
        session.answer(["x" * 90])
        self.assertFalse(session.must_close)
        session.next_command()
        session.answer(["x" * 90])
        self.assertTrue(session.dropped)
        self.assertTrue(session.must_close)
        self.assertEqual(session.pending_output, b"")

    def test_sent_output_leaves_the_rest(self):
        session = session_with(b"users\n")
        session.next_command()
        session.answer(["alice"])
        session.sent(3)
        self.assertEqual(session.pending_output, b"ce\nOK\n")


class Commands(UnitTestCase):

    def test_split(self):
        self.assertEqual(commands.split("  KICK  bob  spamming  again "),
                         ("kick", "bob  spamming  again"))
        self.assertEqual(commands.split("users"), ("users", ""))
        self.assertEqual(commands.split(""), ("", ""))

    def test_the_table(self):
        for name in ("help", "users", "kick", "ban", "unban", "bans", "mute", "unmute",
                     "announce", "stats", "metrics", "reload"):
            self.assertTrue(commands.known(name), name)
        self.assertFalse(commands.known("nope"))
        self.assertFalse(commands.known(""))

    def test_help_has_one_line_per_usage(self):
        lines = commands.help_lines()
        self.assertEqual(len(lines), len(commands.COMMANDS))
        self.assertTrue(any(line.startswith("kick NAME [REASON] ") for line in lines))
        self.assertTrue(any(line.startswith("ban TARGET [DURATION] [REASON] ") for line in lines))
        self.assertEqual(len({line.index(c.description)
                              for line, c in zip(lines, commands.COMMANDS)}), 1)   # aligned


class Paths(UnitTestCase):

    def paths(self, **env):
        with mock.patch.dict(os.environ, env, clear=False):
            for name in ("RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR"):
                if name not in env:
                    os.environ.pop(name, None)
            return default_socket_path(4001), candidate_paths(4001)

    def test_systemd_runtime_directory_first(self):
        default, candidates = self.paths(RUNTIME_DIRECTORY="/run/a:/run/b",
                                         XDG_RUNTIME_DIR="/run/user/7")
        self.assertEqual(default, "/run/a/4001.sock")
        self.assertEqual(candidates, ["/run/a/4001.sock", "/run/user/7/chat-server/4001.sock",
                                      "/tmp/chat-server-%d/4001.sock" % os.geteuid(),
                                      "/run/chat-server/4001.sock"])

    def test_then_the_users_runtime_directory_then_tmp(self):
        self.assertEqual(self.paths(XDG_RUNTIME_DIR="/run/user/7")[0],
                         "/run/user/7/chat-server/4001.sock")
        default, candidates = self.paths()
        self.assertEqual(default, "/tmp/chat-server-%d/4001.sock" % os.geteuid())
        self.assertEqual(candidates, [default, "/run/chat-server/4001.sock"])

    def test_the_systemd_directory_is_tried_once(self):
        self.assertEqual(self.paths(RUNTIME_DIRECTORY="/run/chat-server")[1],
                         ["/run/chat-server/4001.sock",
                          "/tmp/chat-server-%d/4001.sock" % os.geteuid()])


@unittest.skipUnless(sys.platform.startswith("linux"), "SO_PEERCRED is Linux's")
class PeerCredentials(UnitTestCase):

    def test_a_socket_pair_is_this_process(self):
        a, b = socket.socketpair(socket.AF_UNIX)
        with a, b:
            peer = peer_credentials(a)
        self.assertEqual((peer.pid, peer.uid), (os.getpid(), os.geteuid()))


class Opening(TestCase):
    """ControlServer.open() in this process: the directory and the socket file."""

    timeout = 30

    def server(self, path):
        server = ControlServer(path, lambda line, reply: reply([line]))
        self.addCleanup(server.close)
        return server

    def test_the_directory_is_made_0700_and_the_socket_0600(self):
        path = os.path.join(self.tmpdir("ctl"), "a", "b", "4000.sock")
        server = self.server(path)
        server.open()
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode), 0o700)
        mode = os.lstat(path).st_mode
        self.assertTrue(stat.S_ISSOCK(mode))
        self.assertEqual(stat.S_IMODE(mode), 0o600)
        server.close()
        self.assertFalse(os.path.exists(path))

    def test_an_existing_directory_others_can_read_is_fine(self):
        directory = self.tmpdir("ctl")
        os.chmod(directory, 0o755)
        self.server(os.path.join(directory, "4000.sock")).open()

    def test_a_directory_others_may_write_is_refused(self):
        for mode in (0o777, 0o770, 0o1777):
            directory = self.tmpdir("ctl")
            os.chmod(directory, mode)
            with self.assertRaisesRegex(ControlError, "may be written by group or others"):
                self.server(os.path.join(directory, "4000.sock")).open()
            self.assertEqual(os.listdir(directory), [])

    @unittest.skipUnless(os.geteuid() == 0, "needs root, to give a directory away")
    def test_someone_elses_directory_is_refused(self):
        directory = self.tmpdir("ctl")
        os.chown(directory, pwd.getpwnam("nobody").pw_uid, -1)
        with self.assertRaisesRegex(ControlError, "belongs to uid"):
            self.server(os.path.join(directory, "4000.sock")).open()

    def test_a_symbolic_link_is_refused(self):
        base = self.tmpdir("ctl")
        os.mkdir(os.path.join(base, "real"), 0o700)
        os.symlink(os.path.join(base, "real"), os.path.join(base, "link"))
        with self.assertRaisesRegex(ControlError, "symbolic link"):
            self.server(os.path.join(base, "link", "4000.sock")).open()

    def test_a_stale_socket_is_replaced(self):
        path = os.path.join(self.tmpdir("ctl"), "4000.sock")
        with socket.socket(socket.AF_UNIX) as old:
            old.bind(path)                      # a server that died: its file stays
        self.server(path).open()
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(path)

    def test_a_live_socket_is_refused(self):
        path = os.path.join(self.tmpdir("ctl"), "4000.sock")
        with socket.socket(socket.AF_UNIX) as live:
            live.bind(path)
            live.listen(1)
            with self.assertRaises(ControlError) as caught:
                self.server(path).open()
            self.assertEqual(str(caught.exception),
                             "another server is using the control socket %s" % path)
            self.assertTrue(os.path.exists(path))

    def test_a_file_that_is_no_socket_is_left_alone(self):
        path = os.path.join(self.tmpdir("ctl"), "4000.sock")
        with open(path, "w"):
            pass
        with self.assertRaisesRegex(ControlError, "is not a socket"):
            self.server(path).open()
        self.assertTrue(os.path.isfile(path))


class EchoServer:
    """:data:`ECHO_SERVER` in a subprocess; stopped by closing its stdin."""

    def __init__(self, test, path, **options):
        self.path = path
        self.log = os.path.join(os.path.dirname(os.path.dirname(path)), "control.log")
        options["log"] = self.log
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ECHO_SERVER, ROOT, path, json.dumps(options)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
        test.addCleanup(self.stop)
        self.first_line = self.proc.stdout.readline().decode().strip()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(IO_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        if self.proc.stdin:
            self.proc.stdin.close()

    def peak_memory(self):
        """The process's peak resident size so far, in bytes; None without /proc."""
        try:
            with open("/proc/%d/status" % self.proc.pid) as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except FileNotFoundError:
            return None
        raise AssertionError("no VmHWM in /proc/%d/status" % self.proc.pid)

    def log_text(self):
        with open(self.log) as f:
            return f.read()


class Serving(TestCase):
    """A ControlServer in a loop of its own, as the supervisor runs it."""

    timeout = 30

    def start(self, **options):
        base = self.tmpdir("ctl")
        server = EchoServer(self, os.path.join(base, "run", "4000.sock"), **options)
        self.assertEqual(server.first_line, "ready")
        return server

    def connect(self, server):
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(IO_TIMEOUT)
        sock.connect(server.path)
        c = SocketClient(sock)
        self.addCleanup(c.close)
        return c

    def test_commands_are_answered_in_order_one_at_a_time(self):
        server = self.start()
        c = self.connect(server)
        c.sendraw(b"later first\r\necho second\n\nfail no-such-thing here\nhelp\n")
        c.expect("first", "OK", "second", "OK", "ERR no-such-thing here",
                 "ERR unknown-command help")
        c.sendraw(b"\xff\n")
        c.expect("ERR bad-encoding")

    def test_a_stale_socket_is_replaced_and_a_live_one_refused(self):
        first = self.start()
        os.killpg(first.proc.pid, signal.SIGKILL)
        first.proc.wait()
        self.assertTrue(os.path.exists(first.path))      # left behind
        second = EchoServer(self, first.path)
        self.assertEqual(second.first_line, "ready")
        self.connect(second).send("echo hi")
        third = EchoServer(self, first.path)
        self.assertEqual(third.first_line,
                         "another server is using the control socket %s" % first.path)
        self.assertEqual(third.proc.wait(IO_TIMEOUT), 1)
        c = self.connect(second)
        c.send("echo still here")
        c.expect("still here", "OK")

    def test_a_huge_line_is_refused_unread_and_others_are_served(self):
        server = self.start()
        other = self.connect(server)
        other.send("echo before")
        other.expect("before", "OK")
        peak = server.peak_memory()
        huge = self.connect(server)
        chunk = b"x" * (1 << 20)
        sent = 0
        with self.assertRaises((BrokenPipeError, ConnectionResetError)):
            while sent < 100 << 20:
                huge.sendraw(chunk)
                sent += len(chunk)
                other.send("echo %d" % sent)
                other.expect(str(sent), "OK")
        self.assertLess(sent, 10 << 20)                  # closed long before the end
        self.assertEqual(read_until_eof(huge), b"ERR line-too-long\n")
        other.send("echo after")
        other.expect("after", "OK")
        if peak is not None:
            self.assertLess(server.peak_memory() - peak, 8 << 20)

    def test_a_client_that_never_reads_holds_nothing_up(self):
        server = self.start(max_output=4 << 20)
        sleeper = self.connect(server)
        other = self.connect(server)
        sleeper.send("lines 3000 1000")                  # 3 MB it does not read
        for k in range(20):
            other.send("echo %d" % k)
            other.expect(str(k), "OK")
        sleeper.send("lines 3000 1000")                  # past the cap: dropped
        other.send("echo after")
        other.expect("after", "OK")
        # Dropped with its output: not even the first answer comes whole.
        self.assertLess(len(read_until_eof(sleeper)), 3000 * 1001)
        self.assertIn("its output unread past", server.log_text())

    def test_too_many_connections(self):
        server = self.start(max_connections=2)
        for c in (self.connect(server), self.connect(server)):
            c.send("echo in")
            c.expect("in", "OK")
        third = self.connect(server)
        self.assertEqual(read_until_eof(third), b"ERR too-many-connections\n")

    def test_an_idle_connection_is_closed(self):
        server = self.start(idle_timeout=0.3)
        c = self.connect(server)
        c.send("echo awake")
        c.expect("awake", "OK")
        self.assertEqual(read_until_eof(c), b"ERR idle-timeout\n")

    def test_a_closed_connection_is_logged_and_its_late_answer_dropped(self):
        server = self.start()
        c = self.connect(server)
        c.send("later gone")
        c.close()
        c = self.connect(server)
        c.send("echo alive")
        c.expect("alive", "OK")
        self.assertIn("control connection accepted (uid %d pid " % os.geteuid(),
                      server.log_text())

    @unittest.skipUnless(sys.platform.startswith("linux") and os.geteuid() == 0,
                         "needs Linux (SO_PEERCRED) and root (to become nobody)")
    def test_another_user_is_refused(self):
        server = self.start()
        # Opened wide on purpose: only SO_PEERCRED stands in the way now.
        for path, mode in ((os.path.dirname(os.path.dirname(server.path)), 0o755),
                           (os.path.dirname(server.path), 0o777), (server.path, 0o666)):
            os.chmod(path, mode)
        nobody = pwd.getpwnam("nobody")
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:                            # the child: nobody, trying its luck
            status = 1
            try:
                os.close(read_end)
                os.setgroups([])
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
                sock = socket.socket(socket.AF_UNIX)
                sock.settimeout(IO_TIMEOUT)
                sock.connect(server.path)
                try:
                    sock.sendall(b"echo let me in\n")
                except OSError:
                    pass                        # refused already: the answer is there
                os.write(write_end, read_until_eof(SocketClient(sock)))
                status = 0
            except BaseException as exc:
                os.write(write_end, repr(exc).encode())
            finally:
                os._exit(status)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            answer = pipe.read()
        self.assertEqual((os.waitpid(pid, 0)[1], answer), (0, b"ERR permission-denied\n"))
        self.assertIn("control connection refused: uid %d pid %d is neither"
                      % (nobody.pw_uid, pid), server.log_text())


class Ctl(TestCase):
    """``ctl``: client.main in this process, its output captured, and once
    as a process of its own."""

    timeout = 30

    def setUp(self):
        super().setUp()
        self.base = self.tmpdir("ctl")
        self.echo = EchoServer(self, os.path.join(self.base, "run", "4000.sock"))
        self.assertEqual(self.echo.first_line, "ready")

    def ctl(self, *argv, stdin=None):
        out, err = io.StringIO(), io.StringIO()
        patched = mock.patch.object(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin or b"")))
        with patched, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = client.main(list(argv))
        return status, out.getvalue(), err.getvalue()

    def test_ok_prints_the_answer_and_exits_0(self):
        self.assertEqual(self.ctl("--control", self.echo.path, "echo", "hello", "there"),
                         (0, "hello there\n", ""))

    def test_err_goes_to_stderr_and_exits_1(self):
        self.assertEqual(self.ctl("--control", self.echo.path, "fail", "no-such-user", "bob"),
                         (1, "", "ERR no-such-user bob\n"))

    def test_arguments_not_utf8_go_as_they_are(self):
        self.assertEqual(self.ctl("--control", self.echo.path, "echo", "\udcff"),
                         (1, "", "ERR bad-encoding\n"))

    def test_no_server_exits_2_naming_the_path(self):
        path = os.path.join(self.base, "none.sock")
        status, out, err = self.ctl("--control", path, "users")
        self.assertEqual((status, out), (2, ""))
        self.assertIn("no server answers on its control socket: %s: no such socket\n" % path, err)
        self.assertEqual(len(err.splitlines()), 1)

    def test_a_stale_socket_exits_2(self):
        path = os.path.join(self.base, "stale.sock")
        with socket.socket(socket.AF_UNIX) as old:
            old.bind(path)
        status, out, err = self.ctl("--control", path, "users")
        self.assertEqual(status, 2)
        self.assertIn(path + ": connection refused", err)

    def test_the_socket_is_found_from_the_port(self):
        env = {"RUNTIME_DIRECTORY": os.path.join(self.base, "elsewhere"),
               "XDG_RUNTIME_DIR": self.base}
        os.rename(os.path.join(self.base, "run"), os.path.join(self.base, "chat-server"))
        with mock.patch.dict(os.environ, env):
            self.assertEqual(self.ctl("--port", "4000", "echo", "found"), (0, "found\n", ""))
            with mock.patch.dict(os.environ, {"PORT": "4000"}):
                self.assertEqual(self.ctl("echo", "found"), (0, "found\n", ""))
            status, out, err = self.ctl("--port", "4001", "users")
        self.assertEqual(status, 2)
        for path in candidate_paths(4001):
            self.assertIn(path, err)
        self.assertIn(os.path.join(self.base, "elsewhere", "4001.sock"), err)

    def test_commands_from_stdin(self):
        script = b"echo one\n\nfail nope\r\necho two\n"
        self.assertEqual(self.ctl("--control", self.echo.path, stdin=script),
                         (1, "one\ntwo\n", "ERR nope\n"))
        self.assertEqual(self.ctl("--control", self.echo.path, "-", stdin=b"echo 1\necho 2\n"),
                         (0, "1\n2\n", ""))

    def test_no_answer_in_time_exits_2(self):
        status, out, err = self.ctl("--control", self.echo.path, "--timeout", "0.2", "hang")
        self.assertEqual(status, 2)
        self.assertIn("no answer to 'hang'", err)

    def test_a_server_that_closes_early_exits_2(self):
        path = os.path.join(self.base, "rude.sock")
        listener = socket.socket(socket.AF_UNIX)
        self.addCleanup(listener.close)
        listener.bind(path)
        listener.listen(1)

        def hang_up():
            conn, _ = listener.accept()
            conn.close()
        thread = threading.Thread(target=hang_up, daemon=True)
        thread.start()
        status, out, err = self.ctl("--control", path, "users")
        thread.join(IO_TIMEOUT)
        self.assertEqual(status, 2)
        self.assertIn("closed the connection before answering 'users'", err)

    def test_usage_errors_exit_2_without_a_traceback(self):
        for argv in (["--port", "nope", "users"], ["--timeout", "0", "users"],
                     ["-", "users"], ["--control", self.echo.path, "announce", "a\nb"]):
            status, out, err = self.ctl(*argv)
            self.assertEqual(status, 2, argv)
            self.assertIn("error:", err)
            self.assertNotIn("Traceback", err)
        with mock.patch.dict(os.environ, {"PORT": "99999"}):
            status, out, err = self.ctl("users")
        self.assertEqual(status, 2)
        self.assertIn("PORT environment variable", err)

    def test_help_explains_itself(self):
        status, out, err = self.ctl("--help")
        self.assertEqual(status, 0)
        for text in ("exit status:", "kick NAME [REASON]", "/run/chat-server/PORT.sock",
                     "$XDG_RUNTIME_DIR/chat-server/PORT.sock", "socat"):
            self.assertIn(text, out)

    def test_as_a_process(self):
        status, out, err = run_to_exit(*CTL, "--control", self.echo.path, "echo", "hi")
        self.assertEqual((status, out, err), (0, "hi\n", ""))
        status, out, err = run_to_exit(*CTL, "--control", self.echo.path, "fail", "nope")
        self.assertEqual((status, out, err), (1, "", "ERR nope\n"))
        path = os.path.join(self.base, "none.sock")
        status, out, err = run_to_exit(*CTL, "--control", path, "users")
        self.assertEqual(status, 2)
        self.assertRegex(err, r"\A[^\n]*%s: no such socket[^\n]*\n\Z" % path)


if __name__ == "__main__":
    unittest.main()
