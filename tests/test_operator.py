"""The operator's hand on one host, black-box: the control socket's
commands over a real Unix socket, felt by real TCP clients.

Every server here gets its own control socket and state directory in a
temporary directory (``--control``, ``--state-dir``).
"""

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request

from support import (BROKER, IO_TIMEOUT, ROOT, TestCase, bound_client, control, run_to_exit, said,
                     wait_line, wait_until)

STRESS = os.path.join(ROOT, "scripts", "stress.py")


class Operated(TestCase):
    """A server with its control socket at ``self.path``."""

    extra = ()

    def setUp(self):
        super().setUp()
        self.dir = self.tmpdir("operator")
        self.path = os.path.join(self.dir, "run", "control.sock")
        self.state = os.path.join(self.dir, "state")
        self.srv = self.server(*self.options())

    def options(self):
        return ("--control", self.path, "--state-dir", self.state) + tuple(self.extra)

    def ctl(self, command):
        return control(self.path, command)

    def wait_metric(self, series, value):
        """Until ``series`` has ``value`` (figures come with heartbeats)."""
        deadline = time.monotonic() + IO_TIMEOUT
        while True:
            samples = dict(line.rsplit(" ", 1) for line in self.ok("metrics")
                           if not line.startswith("#"))
            if samples.get(series) == value:
                return
            self.assertLess(time.monotonic(), deadline, "%s: %s" % (series, samples.get(series)))
            time.sleep(0.1)

    def ok(self, command):
        lines, last = self.ctl(command)
        self.assertEqual(last, "OK", "%s: %r" % (command, lines))
        return lines


class ControlSocketTest(Operated):

    def test_socket_is_private(self):
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(self.path)).st_mode), 0o700)

    def test_help_and_unknown(self):
        lines = self.ok("help")
        for command in ("users", "kick", "ban", "unban", "bans", "mute", "unmute",
                        "announce", "stats", "metrics", "reload"):
            self.assertTrue(any(line.split()[0] == command for line in lines), command)
        self.assertTrue(self.ctl("frobnicate")[1].startswith("ERR unknown-command"))
        self.assertTrue(self.ctl("ban")[1].startswith("ERR bad-argument"))
        self.assertTrue(self.ctl("ban not/an/address")[1].startswith("ERR bad-argument"))

    def test_ctl_exit_statuses(self):
        def ctl(*args):
            return run_to_exit(sys.executable, BROKER, "ctl", "--control", self.path, *args)
        code, out, err = ctl("help")
        self.assertEqual(code, 0, err)
        self.assertIn("kick NAME [REASON]", out)
        code, out, err = ctl("kick", "nobody")
        self.assertEqual((code, err.strip()), (1, "ERR user-not-found"))
        missing = os.path.join(self.dir, "nothing-here.sock")
        code, out, err = run_to_exit(sys.executable, BROKER, "ctl", "--control", missing, "users")
        self.assertEqual(code, 2)
        self.assertIn(missing, err)

    def test_users_lists_logins_in_order(self):
        ada = self.client(self.srv, "ada")
        self.client(self.srv, "bob")
        ada.send("MSG hi")
        ada.barrier()
        lines = self.ok("users")
        self.assertEqual([line.split()[0] for line in lines], ["ada", "bob"])
        self.assertRegex(lines[0], r"^ada node=\S+ from=127\.0\.0\.1:\d+ tls=no "
                                   r"since=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ idle=\d+ "
                                   r"in=\d+ out=\d+ pending=0$")
        self.assertGreaterEqual(int(re.search(r" in=(\d+)", lines[0]).group(1)),
                                len("LOGIN ada\nMSG hi\n"))

    def test_kick(self):
        ada = self.client(self.srv, "ada")
        bob = self.client(self.srv, "bob")
        self.ok("kick bob spamming the room")
        self.assertEqual(bob.expect_closed(), ["ERR kicked spamming the room"])
        ada.expect("INFO bob disconnected")
        ada.expect_nothing_more()                # exactly once
        carol = self.client(self.srv, "carol")
        self.ok("kick carol")
        self.assertEqual(carol.expect_closed(), ["ERR kicked"])
        self.assertEqual(self.ctl("kick carol")[1], "ERR user-not-found")
        self.assertTrue(self.srv.wait_log(re.escape("operator: kicked bob (spamming the room)")))

    def test_ban_by_name(self):
        ada = self.client(self.srv, "ada")
        bob = self.client(self.srv, "bob")
        self.ok("ban BOB 1h flooding")
        self.assertEqual(bob.expect_closed(), ["ERR banned"])
        ada.expect("INFO bob disconnected")
        again = self.client(self.srv)
        again.send("LOGIN Bob")
        self.assertEqual(again.expect_closed(), ["ERR banned"])
        lines = self.ok("bans")
        self.assertEqual(len(lines), 1)
        self.assertRegex(lines[0], r"^ban bob until=\S+Z since=\S+Z reason=flooding$")
        self.ok("unban bob")
        self.client(self.srv, "bob")
        self.assertEqual(self.ctl("unban bob")[1].split()[0:2], ["ERR", "not-banned"])

    def test_ban_by_address_and_block(self):
        ada = self.client(self.srv, "ada")
        far = bound_client(self.srv.port, "127.0.0.2")
        self.addCleanup(far.close)
        far.login("far")
        waiting = bound_client(self.srv.port, "127.0.0.2")    # not logged in yet
        self.addCleanup(waiting.close)
        waiting.send("PING")
        waiting.expect("PONG")
        self.ok("ban 127.0.0.2")
        self.assertEqual(far.expect_closed(), ["ERR banned"])
        self.assertEqual(waiting.expect_closed(), ["ERR banned"])
        ada.expect("INFO far disconnected")
        refused = bound_client(self.srv.port, "127.0.0.2")
        self.addCleanup(refused.close)
        self.assertEqual(refused.expect_closed(), ["ERR banned"])
        # A block: every address in it, and nobody outside.
        near = bound_client(self.srv.port, "127.0.1.9")
        self.addCleanup(near.close)
        near.login("near")
        self.ok("ban 127.0.1.0/24")
        at_once = bound_client(self.srv.port, "127.0.1.10")    # OK: the acceptor has it
        self.addCleanup(at_once.close)
        self.assertEqual(at_once.expect_closed(), ["ERR banned"])
        self.assertEqual(near.expect_closed(), ["ERR banned"])
        self.client(self.srv, "still-here").send("PING")
        self.ok("unban 127.0.0.2")
        self.ok("unban 127.0.1.0/24")
        bound_client(self.srv.port, "127.0.0.2").login("back").close()
        self.wait_metric('chat_connections_refused_total{reason="banned"}', "2")

    def test_ban_expires(self):
        bob = self.client(self.srv, "bob")
        self.ok("ban bob 2s")
        self.assertEqual(bob.expect_closed(), ["ERR banned"])
        deadline = time.monotonic() + IO_TIMEOUT
        while True:
            c = self.client(self.srv)
            c.send("LOGIN bob")
            if c.read_line() == "OK":
                break
            self.assertLess(time.monotonic(), deadline, "the ban did not expire")
            time.sleep(0.2)
        self.assertEqual(self.ok("bans"), [])

    def test_mute(self):
        ada = self.client(self.srv, "ada")
        bob = self.client(self.srv, "bob")
        self.ok("mute bob")                      # in effect a moment later
        wait_until(lambda: said(bob, "MSG hello") == ["ERR muted"], what="mute")
        ada.barrier()                            # what bob said before it
        bob.send("MSG one", "DM ada psst", "WHO", "PING")
        bob.expect("ERR muted", "ERR muted", "USER ada", "USER bob", "PONG")
        ada.expect_nothing_more()
        self.ok("unmute bob")
        wait_until(lambda: said(bob, "MSG back") == [], what="unmute")
        wait_line(ada, "MSG bob back", IO_TIMEOUT)

    def test_announce(self):
        ada = self.client(self.srv, "ada")
        bob = self.client(self.srv, "bob")
        waiting = self.client(self.srv)
        self.ok("announce maintenance at 22:00 \x1b[31m")
        ada.expect("NOTICE maintenance at 22:00 \ufffd[31m")
        bob.expect("NOTICE maintenance at 22:00 \ufffd[31m")
        waiting.send("PING")
        waiting.expect("PONG")                   # not logged in: not told

    def test_stats_and_metrics(self):
        ada = self.client(self.srv, "ada")
        self.client(self.srv, "bob")
        ada.send("MSG one")
        ada.barrier()
        deadline = time.monotonic() + IO_TIMEOUT
        while dict(line.split(" ", 1) for line in self.ok("stats")).get("msgs") != "1":
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.1)
        self.assertIn("# TYPE chat_messages_received_total counter", self.ok("metrics"))
        self.wait_metric("chat_users", "2")
        self.wait_metric('chat_logins_total{result="ok"}', "2")

    def test_reload(self):
        self.ok("reload")
        self.assertTrue(self.srv.wait_log("operator asked to reload"))

    def test_garbage_costs_the_chat_nothing(self):
        ada = self.client(self.srv, "ada")
        bob = self.client(self.srv, "bob")
        flood = socket.socket(socket.AF_UNIX)
        self.addCleanup(flood.close)
        flood.connect(self.path)
        flood.settimeout(IO_TIMEOUT)
        chunk = b"x" * (1 << 20)
        try:
            for _ in range(100):                 # 100 MB, no newline
                flood.sendall(chunk)
        except OSError:
            pass                                 # closed on us: as it should
        silent = socket.socket(socket.AF_UNIX)   # asks, never reads
        self.addCleanup(silent.close)
        silent.connect(self.path)
        silent.sendall(b"help\n" * 10000)
        ada.send("MSG still here")
        bob.expect("MSG ada still here")
        started = time.monotonic()
        self.ok("users")
        self.assertLess(time.monotonic() - started, 1.0)


class UnderLoadTest(Operated):
    """The operator is answered at once while the chat is busy."""

    extra = ("--rate", "0", "--metrics", "127.0.0.1:0")

    def test_commands_under_load_are_answered_in_well_under_a_second(self):
        load = subprocess.Popen(
            [sys.executable, STRESS, "fanout", "--port", str(self.srv.port), "--clients", "300",
             "--senders", "10", "--duration", "4", "--procs", "2", "--json"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.addCleanup(lambda: load.poll() is None and os.killpg(load.pid, signal.SIGKILL))
        wait_until(lambda: len(self.ok("users")) >= 300, what="the load's logins")
        slowest = 0.0
        for command in ("users", "stats", "metrics", "bans", "kick nobody") * 4:
            started = time.monotonic()
            self.ctl(command)
            slowest = max(slowest, time.monotonic() - started)
        self.assertLess(slowest, 0.5)
        self.assertEqual(load.wait(30), 0)

    def test_the_metrics_endpoint(self):
        port = int(self.srv.wait_log(r"metrics at http://127\.0\.0\.1:(\d+)/metrics").group(1))
        self.client(self.srv, "ada")
        wait_until(lambda: "chat_users 1" in self.scrape(port), what="the heartbeat's figures")
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=5) as answer:
            self.assertEqual(answer.headers["Content-Type"],
                             "text/plain; version=0.0.4; charset=utf-8")
        with self.assertRaises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen("http://127.0.0.1:%d/" % port, timeout=5)
        self.assertEqual(caught.exception.code, 404)

    @staticmethod
    def scrape(port):
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=5) as answer:
            return answer.read().decode()


class StateTest(TestCase):

    def start(self, state, path):
        return self.server("--control", path, "--state-dir", state)

    def test_bans_survive_a_restart(self):
        dir = self.tmpdir("state")
        path, state = os.path.join(dir, "c.sock"), os.path.join(dir, "state")
        srv = self.start(state, path)
        control(path, "ban 10.9.0.0/16 7d bots")
        control(path, "mute bob")
        srv.stop()
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(state, "bans.json")).st_mode), 0o600)
        srv = self.start(state, path)
        lines, last = control(path, "bans")
        self.assertEqual(last, "OK")
        self.assertEqual([line.split()[:2] for line in lines],
                         [["ban", "10.9.0.0/16"], ["mute", "bob"]])
        bob = self.client(srv, "bob")
        bob.send("MSG hi")
        bob.expect("ERR muted")

    def test_a_state_file_that_does_not_parse_stops_the_server(self):
        for name, text in (("bans.json", '{"bans": [ {"target": "300.1.1.1"'),
                           ("accounts.json", "{not json")):
            with self.subTest(name=name):
                dir = self.tmpdir("state")
                state = os.path.join(dir, "state")
                os.makedirs(state, 0o700)
                with open(os.path.join(state, name), "w") as f:
                    f.write(text)
                code, out, err = run_to_exit(sys.executable, BROKER, "--port", "0",
                                             "--state-dir", state,
                                             "--control", os.path.join(dir, "c.sock"))
                self.assertEqual(code, 2)
                self.assertIn(name, out + err)
