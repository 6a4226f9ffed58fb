"""Recovery: SIGKILL (or SIGSTOP) any process and the server carries on."""

import os
import re
import signal
import subprocess
import unittest

from support import IO_TIMEOUT, Server, TestCase, kill_and_replace

from chatlib.supervisor import MAX_QUICK_DEATHS

RECOVERY_TIME = 1.0      # seconds within which a replacement must be running


class Recovery(TestCase):

    def logged_in(self, server, n):
        return [self.client(server, "user%d" % i) for i in range(n)]

    def split_by_survival(self, clients):
        """Clients whose connection the server closed, and the others with
        the lines each got before its PONG."""
        lost, alive = [], {}
        for c in clients:
            c.send("PING")
            try:
                alive[c] = c.lines_until("PONG")
            except (AssertionError, OSError):
                lost.append(c)
        return lost, alive

    def assert_told_once(self, lost, alive):
        """Each survivor hears exactly one INFO per lost user, and nothing else."""
        expected = sorted("INFO %s disconnected" % c.name for c in lost)
        for c, before in alive.items():
            got = before + c.read_lines(len(lost) - len(before))
            self.assertEqual(sorted(got), expected)
            c.expect_nothing_more()

    def test_worker_death(self):
        s = self.server(workers=2)
        clients = self.logged_in(s, 6)
        kill_and_replace(s, ["chat-worker-0"], RECOVERY_TIME)
        lost, alive = self.split_by_survival(clients)
        self.assertEqual(len(lost), 3, "least-loaded hand-off puts 3 of 6 on each worker")
        self.assert_told_once(lost, alive)
        # The names are free again, and new clients reach the new worker too.
        for c in lost:
            self.client(s, c.name)
        witness = next(iter(alive))
        witness.send("WHO")
        self.assertEqual(len(witness.read_lines(6)), 6)

    def test_broker_and_worker_death(self):
        """The broker and a worker killed together, in either order: every
        survivor still hears once of each of the worker's users it has
        heard from, by the name as typed, and WHO lists only the survivors."""
        for roles in (("chat-broker", "chat-worker-1"), ("chat-worker-1", "chat-broker")):
            with self.subTest(killed_first=roles[0]):
                self.killed_together(roles)

    def killed_together(self, roles):
        s = self.server(workers=2)
        # Mixed case: the INFO must say the name as typed, not its key.
        clients = [self.client(s, "User%d" % i) for i in range(6)]
        for c in clients:                      # everyone has heard of everyone
            c.send("MSG hi from " + c.name)
        for c in clients:
            self.assertEqual(sorted(c.read_lines(5)), ["MSG %s hi from %s" % (o.name, o.name)
                                                       for o in clients if o is not c])
        kill_and_replace(s, roles, RECOVERY_TIME)
        lost, alive = self.split_by_survival(clients)
        self.assertEqual(len(lost), 3, "least-loaded hand-off puts 3 of 6 on each worker")
        self.assert_told_once(lost, alive)
        witness = next(iter(alive))
        witness.send("WHO")
        self.assertEqual(witness.read_lines(3), ["USER " + c.name for c in alive])
        witness.expect_nothing_more()
        s.kill()

    def test_a_login_granted_during_recovery_is_announced_too(self):
        """A LOGIN that waited for a new broker: the directory that broker
        sends the other workers lists the name, so when the broker and the
        user's worker die together later, the others still hear of it."""
        s = self.server(workers=2)
        clients = self.logged_in(s, 4)
        broker = s.roles()["chat-broker"]
        os.kill(broker, signal.SIGSTOP)        # no broker answers meanwhile
        try:
            late = self.client(s)
            late.send("LOGIN Late")
        finally:
            os.kill(broker, signal.SIGKILL)
        late.expect("OK")
        late.name = "Late"
        late.send("MSG hi")
        for c in clients:
            c.expect("MSG Late hi")
        worker = s.wait_log(r"(worker-\d+)\[\d+\] Late logged in").group(1)
        kill_and_replace(s, ("chat-broker", "chat-" + worker), RECOVERY_TIME)
        lost, alive = self.split_by_survival(clients + [late])
        self.assertIn(late, lost)
        self.assert_told_once(lost, alive)

    def test_broker_death(self):
        s = self.server(workers=2)
        clients = self.logged_in(s, 4)
        kill_and_replace(s, ["chat-broker"], RECOVERY_TIME)
        # Connections survive; the new broker knows every user again.
        c0, c1, c2, c3 = clients
        c0.send("WHO")
        self.assertEqual(c0.read_lines(4), ["USER user%d" % i for i in range(4)])
        taken = self.client(s)
        taken.send("LOGIN USER1")
        taken.expect("ERR username-taken")
        c1.send("MSG still here")
        for c in (c0, c2, c3):
            c.expect("MSG user1 still here")
        c2.send("DM user3 psst")
        c3.expect("DM user2 psst")
        for c in clients:
            c.expect_nothing_more()

    def test_requests_wait_for_the_new_broker(self):
        s = self.server(workers=1)
        a = self.client(s, "a")
        b = self.client(s, "b")
        broker = s.roles()["chat-broker"]
        os.kill(broker, signal.SIGSTOP)        # no broker answers meanwhile
        try:
            late = self.client(s)
            late.send("LOGIN a", "LOGIN c")
            a.send("MSG while the broker was away")
            a.send("WHO")
        finally:
            os.kill(broker, signal.SIGKILL)
        late.expect("ERR username-taken", "OK")
        a.expect("USER a", "USER b", "USER c")
        b.expect("MSG a while the broker was away")

    def test_nothing_accepted_is_lost_with_the_broker(self):
        """Lines a worker handed to a broker that dies before routing them go
        to the next broker; a user who left meanwhile is still announced."""
        s = self.server(workers=2)
        clients = self.logged_in(s, 4)
        leaver = self.client(s, "leaver")
        broker = s.roles()["chat-broker"]
        os.kill(broker, signal.SIGSTOP)        # it takes nothing from its links now
        try:
            clients[0].send("DM user1 psst")
            for i, c in enumerate(clients):
                c.send("MSG from %d" % i, "PING")
            leaver.close()
            s.wait_log(r"leaver disconnected")
            got = {}
            for c in clients:                  # PONG: its lines are in the link
                got[c] = []
                line = c.read_line()
                while line != "PONG":
                    got[c].append(line)        # from users on the same worker
                    line = c.read_line()
        finally:
            os.kill(broker, signal.SIGKILL)
        for i, c in enumerate(clients):
            want = ["MSG user%d from %d" % (j, j) for j in range(4) if j != i]
            want.append("INFO leaver disconnected")
            if i == 1:
                want.append("DM user0 psst")
            got[c] += c.read_lines(len(want) - len(got[c]))
            self.assertEqual(sorted(got[c]), sorted(want))
            c.expect_nothing_more()

    def test_acceptor_death(self):
        s = self.server(workers=2)
        a = self.client(s, "a")
        old = s.roles()["chat-acceptor"]
        os.kill(old, signal.SIGKILL)
        # Connection attempts meanwhile wait in the backlog, never refused.
        b = self.client(s, "b")
        s.replacement("chat-acceptor", old, RECOVERY_TIME)
        b.send("MSG hi")
        a.expect("MSG b hi")
        a.expect_nothing_more()

    def test_hung_worker_is_replaced(self):
        s = self.server("--heartbeat-timeout", "0.5", workers=2)
        clients = self.logged_in(s, 4)
        old = s.roles()["chat-worker-1"]
        os.kill(old, signal.SIGSTOP)
        s.replacement("chat-worker-1", old, 3.0)
        s.wait_log(r"worker-1 \(pid %d\) missed its heartbeats" % old)
        lost, alive = self.split_by_survival(clients)
        self.assertEqual(len(lost), 2)
        self.assert_told_once(lost, alive)

    def test_restart_storm_stops_the_server(self):
        """A worker killed as soon as it starts, every time: after
        MAX_QUICK_DEATHS deaths in a row the supervisor gives up, and the
        server exits with status 1, instead of restarting it forever."""
        s = self.launched(Server(workers=1))
        started = r"started worker-0 \(pid (\d+)\)"
        start = 0
        for _ in range(MAX_QUICK_DEATHS):
            # The supervisor logs each new worker's pid as it starts it:
            # killed at once, the worker dies well within the supervisor's
            # RESTART_WINDOW, which makes it a death at start-up.
            m = s.wait_log(started, start=start)
            start = s.log_lines_from(0).index(m.string, start) + 1
            os.kill(int(m.group(1)), signal.SIGKILL)
        try:
            code = s.proc.wait(IO_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.fail("still running after %d deaths at start-up:\n%s"
                      % (MAX_QUICK_DEATHS, s.log()))
        self.assertEqual(code, 1)
        self.assertTrue(s.wait_log_end())
        log = s.log()
        self.assertIn("worker-0 keeps dying at start-up; giving up", log)
        self.assertEqual(len(re.findall(started, log)), MAX_QUICK_DEATHS, log)
        self.assertNotIn("Traceback", log)


if __name__ == "__main__":
    unittest.main()
