"""Accounts, black-box: every line of the README's "Accounts" table over
real sockets, on one host and across two nodes; the operator's `ctl
account`; the throttle; accounts kept across restarts of the server and
of Redis, and a file left by a crash mid-write.

Registering is slow on purpose (a password check costs ~40 ms of scrypt):
each test registers few names.
"""

import os
import sys

from support import (BROKER, IO_TIMEOUT, RedisServer, TestCase, bound_client, control,
                     requires_redis, run_to_exit, said, tls_client, self_signed, wait_until)


def answer(client, line):
    client.send(line)
    return client.read_line(IO_TIMEOUT)


def attempt(server, line):
    """The answer to ``line`` on a new connection, closed at once after it."""
    with server.client() as client:
        return answer(client, line)


class OneHost(TestCase):

    def start(self, *options, state=None, **kwargs):
        self.state = state or os.path.join(self.tmpdir("accounts"), "state")
        self.path = os.path.join(os.path.dirname(self.state), "c.sock")
        return self.server("--control", self.path, "--state-dir", self.state, *options,
                           **kwargs)

    def registered(self, srv, name, password):
        c = self.client(srv, name)
        self.assertEqual(answer(c, "REGISTER " + password), "OK")
        return c

    def test_no_account_changes_nothing(self):
        srv = self.start()
        c = self.client(srv)
        self.assertEqual(answer(c, "LOGIN a b"), "ERR invalid-username")
        self.assertEqual(answer(c, "LOGIN a"), "OK")

    def test_register_then_log_in_with_the_password(self):
        srv = self.start()
        naman = self.registered(srv, "Naman", "correct horse")
        self.assertEqual(answer(naman, "REGISTER again-and-again"), "ERR already-registered")
        naman.send("QUIT")
        naman.expect_closed()
        thief = self.client(srv)
        self.assertEqual(answer(thief, "LOGIN naman"), "ERR bad-password")
        self.assertEqual(answer(thief, "LOGIN Naman wrong horse"), "ERR bad-password")
        self.assertEqual(answer(thief, "LOGIN naman  correct horse  "), "OK")   # spaces, trimmed
        # A name nobody registered: the password is ignored on an open server.
        self.assertEqual(answer(self.client(srv), "LOGIN yudi whatever"), "OK")

    def test_register_rules_and_password_change(self):
        srv = self.start()
        ada = self.client(srv, "ada")
        self.assertEqual(answer(ada, "PASSWORD newpass123"), "ERR not-registered")
        self.assertEqual(answer(ada, "REGISTER short"), "ERR weak-password")
        self.assertEqual(answer(ada, "REGISTER twelve chars"), "OK")
        self.assertEqual(answer(ada, "PASSWORD short"), "ERR weak-password")
        self.assertEqual(answer(ada, "PASSWORD another one"), "OK")
        ada.send("QUIT")
        ada.expect_closed()
        again = self.client(srv)
        self.assertEqual(answer(again, "LOGIN ada twelve chars"), "ERR bad-password")
        self.assertEqual(answer(again, "LOGIN ada another one"), "OK")

    def test_two_right_passwords_racing_for_one_name(self):
        srv = self.start()
        self.registered(srv, "bob", "bob's password").close()
        racers = [self.client(srv) for _ in range(2)]
        for racer in racers:
            racer.send("LOGIN bob bob's password")
        answers = sorted(racer.read_line() for racer in racers)
        self.assertEqual(answers, ["ERR username-taken", "OK"])

    def test_the_throttle_holds_across_connections(self):
        srv = self.start()
        self.registered(srv, "carol", "carol's secret").close()
        refused = None
        for attempt in range(12):
            c = self.client(srv)
            got = answer(c, "LOGIN carol guess%d" % attempt)
            if got == "ERR too-many-attempts":
                refused = attempt
                break
            self.assertEqual(got, "ERR bad-password")
        self.assertIsNotNone(refused, "never throttled")
        self.assertLessEqual(refused, 5)
        # The right password is refused too while the name is throttled.
        self.assertEqual(answer(self.client(srv), "LOGIN carol carol's secret"),
                         "ERR too-many-attempts")
        # Another address and another name are not: the chat goes on.
        other = bound_client(srv.port, "127.0.0.9")
        self.addCleanup(other.close)
        self.assertEqual(answer(other, "LOGIN dave"), "OK")

    def test_closed_server(self):
        srv = self.start("--closed")
        c = self.client(srv)
        self.assertEqual(answer(c, "LOGIN stranger"), "ERR bad-password")
        self.assertEqual(answer(c, "LOGIN stranger some password"), "ERR bad-password")
        code, out, err = self.ctl_add("Member", "member pass")
        self.assertEqual(code, 0, err)
        self.assertEqual(answer(c, "LOGIN member member pass"), "OK")
        self.assertEqual(answer(c, "REGISTER anything-else"), "ERR registration-closed")

    def test_no_register(self):
        srv = self.start("--no-register")
        c = self.client(srv, "ada")
        self.assertEqual(answer(c, "REGISTER twelve chars"), "ERR registration-closed")

    def test_tls_only_for_accounts(self):
        cert, key = self_signed(self.tmpdir("tls"))
        srv = self.start("--accounts-tls-only", tls=(cert, key))
        plain = self.client(srv, "ada")
        self.assertEqual(answer(plain, "REGISTER twelve chars"), "ERR tls-required")
        secure = tls_client(srv.tls_port)
        self.addCleanup(secure.close)
        secure.login("bob")
        self.assertEqual(answer(secure, "REGISTER twelve chars"), "OK")
        secure.send("QUIT")
        secure.expect_closed()
        self.assertEqual(answer(self.client(srv), "LOGIN bob twelve chars"), "ERR tls-required")
        again = tls_client(srv.tls_port)
        self.addCleanup(again.close)
        self.assertEqual(answer(again, "LOGIN bob twelve chars"), "OK")

    def test_the_operator_manages_accounts(self):
        srv = self.start()
        code, out, err = self.ctl_add("Yudi", "yudi's password")
        self.assertEqual(code, 0, err)
        self.assertNotIn("yudi's password", out + err + "\n".join(srv.log_lines))
        self.assertEqual(self.ctl_add("yudi", "other password")[0], 1)     # already-registered
        lines, last = control(self.path, "accounts")
        self.assertEqual(last, "OK")
        self.assertRegex(lines[0], r"^Yudi created=\S+Z last-login=never$")
        yudi = self.client(srv)
        self.assertEqual(answer(yudi, "LOGIN yudi yudi's password"), "OK")
        lines, last = control(self.path, "accounts")
        self.assertNotIn("last-login=never", lines[0])
        # Removing an account does not disconnect its user.
        self.assertEqual(control(self.path, "account remove yudi")[1], "OK")
        self.assertEqual(said(yudi, "WHO"), ["USER yudi"])      # as typed at LOGIN
        self.assertEqual(control(self.path, "accounts")[0], [])
        # A password is never an argument of ctl.
        code, out, err = run_to_exit(sys.executable, BROKER, "ctl", "--control", self.path,
                                     "account", "add", "zed", "secret-on-argv")
        self.assertEqual(code, 2)
        self.assertIn("never given on the command line", err)

    def test_accounts_survive_a_restart_and_a_crash_mid_write(self):
        srv = self.start()
        self.registered(srv, "erin", "erin's password").close()
        srv.stop()
        path = os.path.join(self.state, "accounts.json")
        import stat
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        # What a crash between writing and renaming leaves: a temporary
        # file beside the real one, half written.
        with open(os.path.join(self.state, ".accounts.json.dead.tmp"), "w") as half:
            half.write('{"version": 1, "accounts": [{"name": "erin", "pass')
        srv = self.start(state=self.state)
        self.assertEqual(answer(self.client(srv), "LOGIN erin erin's password"), "OK")

    # -- helpers ----------------------------------------------------------------

    def ctl_add(self, name, password):
        """``ctl account add NAME`` with the password on stdin, as a script does."""
        import subprocess
        proc = subprocess.run([sys.executable, BROKER, "ctl", "--control", self.path,
                               "account", "add", name], input=password + "\n",
                              capture_output=True, text=True, timeout=IO_TIMEOUT)
        return proc.returncode, proc.stdout, proc.stderr


@requires_redis
class TwoNodes(TestCase):
    timeout = 90

    def node(self, node_id, redis, *options):
        path = os.path.join(self.dir, node_id + ".sock")
        srv = self.server("--redis", redis.url, "--node-id", node_id, "--node-lease", 3.0,
                          "--control", path, "--state-dir", os.path.join(self.dir, node_id),
                          *options, workers=1)
        srv.control = path
        return srv

    def test_registered_on_a_valid_on_b_removed_on_b_refused_on_a(self):
        self.dir = self.tmpdir("accounts-cluster")
        redis = RedisServer().start()
        self.addCleanup(redis.stop)
        a, b = self.node("A", redis, "--closed"), self.node("B", redis, "--closed")
        self.assertEqual(control(a.control, "account add ada ada's password")[1], "OK")
        wait_until(lambda: attempt(b, "LOGIN ada ada's password") == "OK",
                   what="the account reaching B")
        # Redis restarted empty: the nodes give it their accounts back.
        redis.restart()
        a.wait_log(r"giving redis back this node's \d+ account records")
        c = self.node("C", redis, "--closed")
        wait_until(lambda: attempt(c, "LOGIN ada ada's password") == "OK",
                   what="the account reaching a new node")
        self.assertEqual(control(b.control, "account remove ada")[1], "OK")
        wait_until(lambda: attempt(a, "LOGIN ada ada's password") == "ERR bad-password",
                   what="the removal reaching A")

    def test_the_throttle_holds_across_nodes(self):
        self.dir = self.tmpdir("accounts-cluster")
        redis = RedisServer().start()
        self.addCleanup(redis.stop)
        a, b = self.node("A", redis), self.node("B", redis)
        eve = self.client(a, "eve")
        self.assertEqual(answer(eve, "REGISTER eve's password"), "OK")
        wait_until(lambda: attempt(b, "LOGIN eve wrong") == "ERR bad-password",
                   what="the account reaching B")
        answers = [attempt(node, "LOGIN eve guess") for node in (a, b, a, b, a, b)]
        self.assertEqual(answers[-1], "ERR too-many-attempts", answers)
        self.assertLessEqual(answers.count("ERR bad-password"), 4)   # 5 failures, one above
