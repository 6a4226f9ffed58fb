"""Upgrading without logging anyone out, black-box: a copy of the project
in a temporary directory is started, changed on disk, and upgraded with
``ctl upgrade`` while real clients chat through it.
"""

import os
import re
import shutil
import socket
import threading

from support import (IO_TIMEOUT, ROOT, Client, RedisServer, TestCase, control, per_start_method,
                     process_role, requires_redis, said, self_signed, session_pids, tls_client,
                     wait_until)

VERSION_LINE = re.compile(r'^__version__ = .*$', re.M)
UPGRADE_TIMEOUT = 20


class Upgradable(TestCase):
    """A server run from a copy of the project (``self.app``), with its
    control socket at ``self.path``."""

    workers = 2
    extra = ()

    def setUp(self):
        super().setUp()
        base = self.tmpdir("upgrade")
        self.app = os.path.join(base, "app")
        os.mkdir(self.app)
        for name in ("broker.py", "worker.py"):
            shutil.copy(os.path.join(ROOT, name), self.app)
        shutil.copytree(os.path.join(ROOT, "chatlib"), os.path.join(self.app, "chatlib"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        self.path = os.path.join(base, "run", "control.sock")
        self.srv = self.server("--control", self.path, "--state-dir", os.path.join(base, "state"),
                               *self.extra, broker=os.path.join(self.app, "broker.py"),
                               workers=self.workers, **self.server_options(base))

    def server_options(self, base):
        return {}

    def ctl(self, command):
        return control(self.path, command, timeout=UPGRADE_TIMEOUT)

    def upgrade(self, options=""):
        lines, last = self.ctl(("upgrade " + options).strip())
        self.assertEqual(last, "OK", lines)
        return lines[0]

    def change(self, path, old, new):
        """Edit a file of the copy, as ``git pull`` would."""
        path = os.path.join(self.app, path)
        with open(path) as f:
            text = f.read()
        self.assertIn(old, text)
        with open(path, "w") as f:
            f.write(text.replace(old, new))

    def set_version(self, version):
        path = os.path.join(self.app, "chatlib", "__init__.py")
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(VERSION_LINE.sub('__version__ = "%s"' % version, text))

    def children(self):
        """The server's processes but the main one (not multiprocessing's helpers)."""
        return {pid for pid in session_pids(self.srv.proc.pid)
                if pid != self.srv.proc.pid and (process_role(pid) or "").startswith("chat-")}


class UpgradeTest(Upgradable):

    def test_users_notice_nothing(self):
        alice, bob, carol = (self.client(self.srv, name) for name in ("alice", "bob", "carol"))
        who = said(alice, "WHO")
        old = self.children()
        alice.sendraw(b"MSG hel")                 # half a line before the switch
        self.set_version("9.9.9")
        line = self.upgrade()
        self.assertRegex(line, r"^upgraded from \S+ to 9\.9\.9 in [\d.]+ s: 3 connections moved$")
        alice.sendraw(b"lo\n")
        bob.expect("MSG alice hello")
        carol.expect("MSG alice hello")
        self.assertEqual(said(carol, "WHO"), who)
        bob.send("DM carol still here")
        carol.expect("DM bob still here")
        self.assertIn("version 9.9.9", self.ctl("version")[0])
        self.assertIn("upgrades 1", self.ctl("version")[0])
        wait_until(lambda: not (old & self.children()), what="the old processes gone")
        self.assertIn(self.srv.proc.pid, session_pids(self.srv.proc.pid))   # the same main
        dave = self.client(self.srv, "dave")       # new connections are served
        dave.send("MSG hi")
        for user in (alice, bob, carol):
            user.expect("MSG dave hi")
            user.expect_nothing_more()

    def test_numbered_lines_through_two_upgrades(self):
        sender, reader = self.client(self.srv, "sender"), self.client(self.srv, "reader")
        count = 300
        done = threading.Event()

        def chat():
            for k in range(count):
                sender.send("MSG line %d" % k)
                if done.wait(0.005):
                    return
        writer = threading.Thread(target=chat)
        writer.start()
        try:
            self.upgrade()
            self.upgrade()
        finally:
            writer.join(IO_TIMEOUT)
        self.assertEqual(reader.read_lines(count),
                         ["MSG sender line %d" % k for k in range(count)])
        reader.expect_nothing_more()

    def test_connections_during_the_switch_are_served(self):
        answers = []
        done = threading.Event()

        def arrive():
            k = 0
            while not done.is_set():
                with Client(self.srv.port) as c:
                    c.send("LOGIN late%d" % k, "PING")
                    answers.append(c.read_lines(2))
                k += 1
        arriving = threading.Thread(target=arrive)
        arriving.start()
        try:
            wait_until(lambda: answers, what="a first login")
            self.upgrade()
            self.upgrade()
        finally:
            done.set()
            arriving.join(IO_TIMEOUT)
        self.assertGreater(len(answers), 2)
        self.assertEqual([a for a in answers if a != ["OK", "PONG"]], [])

    def stat(self, name):
        return dict(line.split(" ", 1) for line in self.ctl("stats")[0]).get(name)

    def test_figures_count_on(self):
        alice, bob = self.client(self.srv, "alice"), self.client(self.srv, "bob")
        for k in range(5):
            alice.send("MSG %d" % k)
        bob.read_lines(5)
        wait_until(lambda: self.stat("msgs") == "5", what="5 messages counted")
        self.upgrade()
        alice.send("MSG 5")
        bob.expect("MSG alice 5")
        wait_until(lambda: self.stat("msgs") == "6", what="6 messages counted")
        metrics = self.ctl("metrics")[0]
        self.assertIn("chat_upgrades_total 1", metrics)
        self.assertIn('chat_logins_total{result="ok"} 2', metrics)
        self.assertIn("chat_connections_accepted_total 2", metrics)   # the old acceptor's

    def test_more_workers_then_fewer(self):
        users = [self.client(self.srv, "u%d" % k) for k in range(6)]
        self.upgrade("--workers 3")
        wait_until(lambda: len(self.children()) == 5, what="3 workers, a broker, an acceptor")
        self.upgrade("--workers 1")
        wait_until(lambda: len(self.children()) == 3, what="1 worker, a broker, an acceptor")
        users[0].send("MSG after")
        for user in users[1:]:
            user.expect("MSG u0 after")
        self.assertEqual(said(users[5], "WHO"), ["USER u%d" % k for k in range(6)])

    def test_what_cannot_change_is_refused(self):
        for options, reason in (("--port 1", "ERR refused --port changes"),
                                ("--workers 0", "ERR refused argument"),
                                ("--no-such-option", "ERR refused unrecognized")):
            lines, last = self.ctl("upgrade " + options)
            self.assertTrue(last.startswith(reason), last)


class StartMethodUpgradeTest(Upgradable):
    """Under every start method the new processes run the new code (under
    ``fork`` and ``forkserver`` they start with ``spawn`` from then on)."""

    start_method = None

    def server_options(self, base):
        return {"start_method": self.start_method}

    def test_chat_goes_on(self):
        alice, bob = self.client(self.srv, "alice"), self.client(self.srv, "bob")
        alice.sendraw(b"MSG hel")
        self.set_version("9.9.9")
        self.assertIn(" to 9.9.9 ", self.upgrade())
        alice.sendraw(b"lo\n")
        bob.expect("MSG alice hello")
        self.assertIn(" to 9.9.9 ", self.upgrade())     # from spawned processes
        bob.send("MSG back")
        alice.expect("MSG bob back")


per_start_method(globals(), StartMethodUpgradeTest)


class RefusedUpgradeTest(Upgradable):
    """The new code cannot run: the old processes carry on, untouched."""

    def check_refused(self, reason):
        alice, bob = self.client(self.srv, "alice"), self.client(self.srv, "bob")
        old = self.children()
        lines, last = self.ctl("upgrade")
        self.assertRegex(last, "^ERR upgrade-failed " + reason)
        self.assertEqual(self.children(), old)
        alice.send("MSG still here")
        bob.expect("MSG alice still here")
        self.assertIn("upgrades 0", self.ctl("version")[0])
        self.assertTrue(any("upgrade refused" in line for line in self.srv.log_lines))

    def test_syntax_error(self):
        self.change("worker.py", "class Worker(Service):", "class Worker(Service)")
        self.check_refused("the new code does not start: SyntaxError")

    def test_missing_module(self):
        os.remove(os.path.join(self.app, "chatlib", "flood.py"))
        self.check_refused("the new code does not start: ModuleNotFoundError")

    def test_a_process_that_dies_at_start(self):
        self.change("worker.py", "    def start(self):\n", "    def start(self):\n        raise SystemExit(3)\n")
        self.check_refused("worker-\\d exited with status 3 at start-up")

    def test_a_state_it_cannot_read(self):
        self.change(os.path.join("chatlib", "upgrade", "state.py"), "READS = (1,)", "READS = (2,)")
        self.check_refused("the new code reads state versions \\[2\\]")

    def test_one_at_a_time(self):
        first = socket.socket(socket.AF_UNIX)
        self.addCleanup(first.close)
        first.connect(self.path)
        first.sendall(b"upgrade\n")
        self.srv.wait_log(r"upgrade: asked by the operator")    # the first is under way
        lines, last = self.ctl("upgrade")
        self.assertEqual(last, "ERR busy an upgrade is under way")
        first.settimeout(UPGRADE_TIMEOUT)
        answer = b""
        while not answer.endswith(b"OK\n"):
            chunk = first.recv(4096)
            self.assertTrue(chunk, answer)
            answer += chunk


class TlsUpgradeTest(Upgradable):
    """A TLS user's session stays in the old worker, which relays it."""

    def server_options(self, base):
        return {"tls": self_signed(base)}

    def test_tls_user_is_relayed(self):
        plain = self.client(self.srv, "plain")
        secure = tls_client(self.srv.tls_port)
        self.addCleanup(secure.close)
        secure.login("secure")
        before = [l for l in self.ctl("users")[0] if l.startswith("secure ")]
        secure.sendraw(b"MSG hal")
        line = self.upgrade()
        self.assertTrue(line.endswith("2 connections moved (1 over TLS, relayed)"), line)
        secure.sendraw(b"f\n")
        plain.expect("MSG secure half")
        plain.send("MSG back")
        secure.expect("MSG plain back")
        wait_until(lambda: any(l.startswith("relayed 1 TLS") for l in self.ctl("version")[0]),
                   what="the relay counted")
        wait_until(lambda: {"clients 2", "tls-handshakes 1", "tls-relayed 1"}
                   <= set(self.ctl("stats")[0]), what="the figures after the upgrade")
        after = [l for l in self.ctl("users")[0] if l.startswith("secure ")]
        self.assertRegex(after[0], r" from=127\.0\.0\.1:[1-9]\d* tls=yes ")
        self.assertEqual(after[0].split()[:5], before[0].split()[:5])
        self.upgrade()                            # the plaintext end moves again
        plain.send("DM secure again")
        secure.expect("DM plain again")
        secure.send("QUIT")
        secure.read_until_eof()
        plain.expect("INFO secure disconnected")
        wait_until(lambda: not any(l.startswith("relayed") for l in self.ctl("version")[0]),
                   what="the relay gone with its last user")

    def test_relays_are_bounded(self):
        secure = tls_client(self.srv.tls_port)
        self.addCleanup(secure.close)
        secure.login("secure")
        self.upgrade("--max-tls-relays 2")        # 0 relays + 2 workers: may be 2
        lines, last = self.ctl("upgrade")         # 1 relay + 2 workers: 3
        self.assertTrue(last.startswith("ERR upgrade-failed 1 TLS relays run"), last)
        self.upgrade("--max-tls-relays 3")
        secure.send("PING")
        secure.expect("PONG")


@requires_redis
class ClusterUpgradeTest(TestCase):
    """A node upgrades alone, keeping its node id, its lease and its place
    on the bus: the other node sees nothing."""

    timeout = 90

    def setUp(self):
        super().setUp()
        self.redis = RedisServer().start()
        self.addCleanup(self.redis.stop)
        self.dir = self.tmpdir("upgrade-cluster")

    def node(self, node_id):
        path = os.path.join(self.dir, node_id + ".sock")
        srv = self.server("--redis", self.redis.url, "--node-id", node_id, "--control", path,
                          "--state-dir", os.path.join(self.dir, node_id), workers=2)
        srv.control = path
        return srv

    def upgrade(self, node):
        lines, last = control(node.control, "upgrade", timeout=UPGRADE_TIMEOUT)
        self.assertEqual(last, "OK", lines)

    def test_every_node_in_turn(self):
        a, b = self.node("A"), self.node("B")
        ada, amy = self.client(a, "ada"), self.client(a, "amy")
        bob = self.client(b, "bob")
        who = said(bob, "WHO")
        count = 200
        done = threading.Event()

        def chat(sender, tag):
            for k in range(count):
                sender.send("MSG %s %d" % (tag, k))
                if done.wait(0.005):
                    return
        writers = [threading.Thread(target=chat, args=(ada, "a")),
                   threading.Thread(target=chat, args=(bob, "b"))]
        for writer in writers:
            writer.start()
        try:
            self.upgrade(a)
            self.upgrade(b)
        finally:
            for writer in writers:
                writer.join(IO_TIMEOUT)
        got = amy.read_lines(2 * count)
        others = [line for line in got if not line.startswith(("MSG ada ", "MSG bob "))]
        self.assertEqual(others, [])
        bobs = [line for line in got if line.startswith("MSG bob ")]
        self.assertEqual(len(bobs), len(set(bobs)), sorted(set(l for l in bobs if bobs.count(l) > 1)))
        for sender, tag in (("ada", "a"), ("bob", "b")):
            self.assertEqual([line for line in got if line.startswith("MSG %s " % sender)],
                             ["MSG %s %s %d" % (sender, tag, k) for k in range(count)])
        self.assertEqual(bob.read_lines(count), ["MSG ada a %d" % k for k in range(count)])
        self.assertEqual(ada.read_lines(count), ["MSG bob b %d" % k for k in range(count)])
        self.assertEqual(said(ada, "WHO"), who)
        self.assertEqual(said(bob, "WHO"), who)
        bob.send("DM amy across")
        amy.expect("DM bob across")
        for user in (ada, amy, bob):
            user.expect_nothing_more()
