"""Cluster mode, black-box: real nodes (``broker.py --redis``) on one real Redis.

Every test starts its own ``redis-server`` on a free port (no persistence)
and its own nodes, and kills them all at the end. Faults are real: a node's
process group is SIGKILLed, Redis is restarted empty, and a FaultProxy
between a node and Redis stalls or cuts their connection.

Absence across nodes is proved with a marker: a user sends ``MSG marker``
after what is being checked; per-sender order means that once the marker
is in, everything before it is too.
"""

import os
import signal
import subprocess
import sys
import time

from support import (BROKER, ROOT, FaultProxy, RedisServer, Server, TestCase, chat_among,
                     example_session, per_start_method, requires_redis, self_signed,
                     wait_line)

LEASE = 3.0                 # seconds: short, so that faults play out quickly


@requires_redis
class ClusterCase(TestCase):
    timeout = 90

    def setUp(self):
        super().setUp()
        self.redis = RedisServer().start()
        self.addCleanup(self.redis.stop)

    start_method = None

    def node(self, node_id, url=None, workers=1, lease=LEASE, cluster="chat", *extra):
        return self.server("--redis", url or self.redis.url, "--node-id", node_id,
                           "--node-lease", lease, "--cluster", cluster, *extra,
                           workers=workers, start_method=self.start_method)

    def proxy(self):
        proxy = FaultProxy(self.redis.port)
        self.addCleanup(proxy.close)
        return proxy

    def user(self, node, name):
        return self.client(node, name)

    @staticmethod
    def before_marker(client, sender):
        """The lines ``client`` gets before ``sender``'s ``MSG marker``."""
        sender.send("MSG marker")
        return client.lines_until("MSG %s marker" % sender.name)


class TestTwoNodes(ClusterCase):
    def test_the_example_session_with_naman_and_yudi_on_two_nodes(self):
        a, b = self.node("A"), self.node("B")
        example_session(self.user(a, "Naman"), self.user(b, "Yudi"), self.client(b))

    def test_users_on_three_nodes_chat(self):
        nodes = [self.node("A", workers=2), self.node("B"), self.node("C")]
        chat_among([self.user(nodes[i % 3], "u%d" % i) for i in range(6)])

    def test_names_are_unique_across_nodes_case_insensitively(self):
        a, b = self.node("A"), self.node("B")
        self.user(a, "Naman")
        for name in ["Naman", "naman", "NAMAN"]:
            c = self.client(b)
            c.send("LOGIN " + name)
            c.expect("ERR username-taken")

    def test_of_30_connections_racing_for_a_name_over_two_nodes_one_wins(self):
        nodes = [self.node("A"), self.node("B")]
        clients = [self.client(nodes[i % 2]) for i in range(30)]
        for c in clients:
            c.send("LOGIN racer")
        answers = [c.read_line() for c in clients]
        self.assertEqual(answers.count("OK"), 1, answers)
        self.assertEqual(answers.count("ERR username-taken"), 29, answers)

    def test_who_lists_every_node_in_login_order(self):
        a, b = self.node("A"), self.node("B")
        names = ["u1", "u2", "u3", "u4", "u5"]
        users = [self.user((a, b)[i % 2], n) for i, n in enumerate(names)]
        for u in users[:2]:
            u.send("WHO")
            u.expect(*["USER " + n for n in names])

    def test_who_is_linearizable_across_nodes(self):
        a, b = self.node("A"), self.node("B")
        watcher = self.user(b, "watcher")
        joiner = self.user(a, "joiner")                 # its OK has been sent
        watcher.send("WHO")
        watcher.expect("USER watcher", "USER joiner")
        joiner.send("QUIT")
        wait_line(watcher, "INFO joiner disconnected", 5)
        watcher.send("WHO")
        watcher.expect("USER watcher")

    def test_broadcast_reaches_every_node_in_order_and_info_comes_last(self):
        a, b = self.node("A", workers=2), self.node("B", workers=2)
        senders = [self.user(a, "sa"), self.user(b, "sb")]
        readers = [self.user(a, "ra"), self.user(b, "rb"), self.user(a, "ra2"),
                   self.user(b, "rb2")]
        n = 300
        for s in senders:
            s.send(*["MSG %s-%d" % (s.name, i) for i in range(n)])
        for s in senders:
            s.send("QUIT")
        for r in readers:
            got = {s.name: [] for s in senders}
            gone = set()
            while len(gone) < len(senders):
                line = r.read_line()
                word, who, rest = line.split(" ", 2)
                if word == "INFO":
                    self.assertEqual(len(got[who]), n, "INFO %s before its last MSG" % who)
                    gone.add(who)
                elif word == "MSG" and who in got:
                    got[who].append(rest)
            for s in senders:
                self.assertEqual(got[s.name], ["%s-%d" % (s.name, i) for i in range(n)])
        watcher = readers[1]
        self.assertEqual(self.before_marker(watcher, readers[0]), [])

    def test_dm_across_nodes_both_ways(self):
        a, b = self.node("A"), self.node("B")
        x, y = self.user(a, "x"), self.user(b, "y")
        x.send("DM y one")
        y.expect("DM x one")
        y.send("DM X two")
        x.expect("DM y two")
        x.send("DM nobody hi")
        x.expect("ERR user-not-found")
        fresh = self.user(b, "fresh")           # maybe not in A's directory yet
        x.send("DM fresh welcome")
        fresh.expect("DM x welcome")
        fresh.send("QUIT")
        wait_line(x, "INFO fresh disconnected", 5)
        x.send("DM fresh hello?")
        x.expect("ERR user-not-found")

    def test_two_clusters_on_one_redis_do_not_see_each_other(self):
        a = self.node("A", cluster="one")
        b, c = self.node("B", cluster="two"), self.node("C", cluster="two")
        x, y = self.user(a, "same"), self.user(b, "same")
        x.send("MSG only for one", "WHO")
        x.expect("USER same")                   # the MSG's entry is in Redis by now
        y.send("WHO")
        y.expect("USER same")
        # Through cluster two's stream, after it: nothing of cluster one before.
        self.assertEqual(self.before_marker(y, self.user(c, "mark")), [])

    def test_a_second_live_node_with_the_same_id_is_refused(self):
        self.node("A")                              # renews its lease: alive
        twin = self.launched(Server("--redis", self.redis.url, "--node-id", "A",
                                    "--node-lease", LEASE, workers=1))
        self.assertEqual(twin.proc.wait(30), 2)
        twin.wait_log_end()
        self.assertIn("node id 'A' is in use by another live node", twin.log())
        self.assertNotIn("listening on", twin.log())

    def test_a_node_restarted_within_its_old_lease_waits_for_it_and_goes_on(self):
        first = self.node("A", lease=2)
        self.user(first, "old")
        watcher = self.user(self.node("B", lease=2), "watcher")
        os.killpg(first.proc.pid, signal.SIGKILL)
        again = self.node("A", lease=2)             # the old run's lease still runs
        again.wait_log("waiting to see whether it is alive")
        wait_line(watcher, "INFO old disconnected", 5)
        self.user(again, "old")

    def test_a_node_that_stops_announces_its_users_at_once(self):
        a, b = self.node("A", lease=30), self.node("B", lease=30)
        self.user(a, "leaver")
        stay = self.user(b, "stay")
        self.assertEqual(a.stop(), 0)
        wait_line(stay, "INFO leaver disconnected", 5)     # not after 30 s
        self.user(b, "leaver")
        self.assertEqual(self.before_marker(stay, self.user(b, "m")), [])

    def test_a_password_is_used_and_never_logged(self):
        secret = "s3cret-pw"
        locked = RedisServer(password=secret).start()
        self.addCleanup(locked.stop)
        in_url = self.node("A", url=locked.url)
        from_env = self.server("--redis", locked.url.replace(secret, ""), "--node-id", "B",
                               "--log-level", "DEBUG", workers=1,
                               env={"REDIS_PASSWORD": secret})
        x, y = self.user(in_url, "x"), self.user(from_env, "y")
        x.send("MSG through a locked redis")
        y.expect("MSG x through a locked redis")
        for node in (in_url, from_env):
            self.assertIn("redis://:***@127.0.0.1", node.log())
            self.assertNotIn(secret, node.log())

    def test_nodes_reach_redis_over_tls_with_rediss(self):
        cert = self_signed(self.tmpdir("rediss"))
        secure = RedisServer(tls=cert).start()
        self.addCleanup(secure.stop)
        trust = {"SSL_CERT_FILE": cert[0]}
        a, b = [self.server("--redis", secure.tls_url, "--node-id", node, workers=1, env=trust)
                for node in ("A", "B")]
        x, y = self.user(a, "x"), self.user(b, "y")
        x.send("MSG sealed", "WHO")
        x.expect("USER x", "USER y")
        y.expect("MSG x sealed")
        self.assertIn("rediss://localhost:%d/0" % secure.tls_port, a.log())

    def test_garbage_on_the_bus_is_skipped_and_logged(self):
        a, b = self.node("A"), self.node("B")
        x, y = self.user(a, "x"), self.user(b, "y")
        self.redis.command("XADD", "chat:bus", "*", "o", "evil", "d", b"Zgarbage")
        self.redis.command("XADD", "chat:bus", "*", "o", "evil", "l", b"\xff\xfe")
        self.redis.command("XADD", "chat:bus", "*", "o", "evil", "d", b"B\x00\x00")
        x.send("MSG still here")
        y.expect("MSG x still here")
        a.wait_log("skipping a malformed bus entry")
        self.assertNotIn("Traceback", a.log() + b.log())

    def test_the_statistics_line_says_how_the_cluster_is(self):
        a = self.server("--redis", self.redis.url, "--node-id", "A", "--stats-interval", 0.2,
                        workers=1)
        b = self.node("B")
        x, y = self.user(a, "x"), self.user(b, "y")
        x.send("MSG counted")
        y.expect("MSG x counted")
        a.wait_log(r"cluster: redis=up other-users=1 entries-out=[1-9]\d* entries-in=[1-9]")

    def test_bad_redis_url_is_one_clear_line(self):
        out = subprocess.run([sys.executable, BROKER, "--redis", "http://x"], cwd=ROOT,
                             capture_output=True, text=True, timeout=30)
        self.assertEqual(out.returncode, 2)
        self.assertIn("--redis", out.stderr)
        self.assertNotIn("Traceback", out.stderr)


class TestStartMethod(ClusterCase):
    def test_two_nodes_chat(self):
        a, b = self.node("A", workers=2), self.node("B", workers=2)
        x, y = self.user(a, "x"), self.user(b, "y")
        x.send("MSG hi", "DM y psst", "WHO")
        x.expect("USER x", "USER y")
        y.expect("MSG x hi", "DM x psst")
        y.send("QUIT")
        x.expect("INFO y disconnected")


per_start_method(globals(), TestStartMethod)


class TestFaults(ClusterCase):
    def test_a_dead_broker_is_replaced_and_nobody_notices(self):
        a, b = self.node("A", workers=2), self.node("B")
        here, there = self.user(a, "here"), self.user(b, "there")
        a.replacement("chat-broker", None, 5)
        old = a.roles()["chat-broker"]
        os.kill(old, signal.SIGKILL)
        here.send(*["MSG h%d" % i for i in range(50)])
        there.send(*["MSG t%d" % i for i in range(50)])
        self.assertEqual(there.read_lines(50), ["MSG here h%d" % i for i in range(50)])
        self.assertEqual(here.read_lines(50), ["MSG there t%d" % i for i in range(50)])
        a.replacement("chat-broker", old, 10)
        self.assertEqual(self.before_marker(there, here), [])
        self.assertEqual(self.before_marker(here, there), [])
        here.send("WHO")
        here.expect("USER here", "USER there")

    def test_a_dead_worker_is_announced_on_every_node_once(self):
        a, b = self.node("A", workers=2), self.node("B")
        on_a = [self.user(a, "a%d" % i) for i in range(4)]     # two on each worker
        there = self.user(b, "there")
        broker = a.roles()["chat-broker"]
        old = a.roles()["chat-worker-0"]
        os.kill(old, signal.SIGKILL)
        gone = {line.split()[1] for line in there.read_lines(2)}
        self.assertLess(gone, {u.name for u in on_a})
        new = a.replacement("chat-worker-0", old, 5)
        self.user(a, "n0")                      # least loaded: both on the new worker
        self.user(a, "n1")
        os.kill(new, signal.SIGKILL)
        self.assertEqual(sorted(there.read_lines(2)),
                         ["INFO n0 disconnected", "INFO n1 disconnected"])
        self.assertEqual(a.roles()["chat-broker"], broker)      # it carried on
        survivor = next(u for u in on_a if u.name not in gone)
        self.assertEqual(self.before_marker(there, survivor), [])

    def test_a_dead_node_is_announced_once_by_the_survivors_within_the_lease(self):
        a, b, c = self.node("A"), self.node("B"), self.node("C")
        self.user(a, "gone1")
        self.user(a, "gone2")
        on_b, on_c = self.user(b, "onb"), self.user(c, "onc")
        killed = time.monotonic()
        os.killpg(a.proc.pid, signal.SIGKILL)
        for u in (on_b, on_c):
            got = sorted(u.read_lines(2, timeout=LEASE + 3))
            self.assertEqual(got, ["INFO gone1 disconnected", "INFO gone2 disconnected"])
        self.assertLess(time.monotonic() - killed, LEASE + 2)
        self.user(b, "gone1")                                   # the name is free
        self.assertEqual(self.before_marker(on_c, on_b), [])        # each INFO only once

    def test_a_short_redis_outage_only_delays(self):
        proxy = self.proxy()
        a, b = self.node("A", url=proxy.url, lease=8), self.node("B", lease=8)
        a1, a2, b1 = self.user(a, "a1"), self.user(a, "a2"), self.user(b, "b1")
        proxy.stall()
        a1.send("MSG during", "WHO")
        a2.expect("MSG a1 during")                 # the node's own users at once
        time.sleep(1.5)                            # the outage itself
        proxy.restore()
        a1.expect("USER a1", "USER a2", "USER b1")
        wait_line(b1, "MSG a1 during", 8)
        self.assertEqual(self.before_marker(b1, a1), [])       # once, and nothing else
        self.assertEqual(a2.lines_until("MSG a1 marker"), [])

    def test_a_request_waiting_too_long_gets_err_unavailable(self):
        proxy = self.proxy()
        a = self.node("A", url=proxy.url, lease=20)
        a1 = self.user(a, "a1")
        proxy.stall()
        started = time.monotonic()
        a1.send("WHO")
        self.assertEqual(a1.read_line(timeout=10), "ERR unavailable")
        self.assertGreater(time.monotonic() - started, 4)
        a1.send("PING")
        a1.expect("PONG")                          # still connected
        proxy.restore()
        a1.send("WHO")
        a1.expect("USER a1")

    def test_a_partitioned_node_gives_up_its_users_before_the_others_announce_them(self):
        proxy = self.proxy()
        a, b = self.node("A", url=proxy.url), self.node("B")
        cut_off, watcher = self.user(a, "cutoff"), self.user(b, "watcher")
        proxy.stall()
        self.assertEqual(cut_off.expect_closed(timeout=LEASE + 2), ["ERR unavailable"])
        wait_line(watcher, "INFO cutoff disconnected", LEASE + 3)
        # One clock for both logs: A gave its user up before B announced it.
        stamp = r"^(\S+ \S+) "
        closed = a.wait_log(stamp + r".*cutoff disconnected \(cluster unavailable\)").group(1)
        reaped = b.wait_log(stamp + r".*node A missed its lease: 1 users").group(1)
        self.assertLess(closed, reaped)
        self.user(b, "cutoff")                     # free, and held once
        proxy.restore()
        again = self.client(a)
        again.send("LOGIN cutoff")
        again.expect("ERR username-taken")
        self.user(a, "newcomer")                   # it serves logins again
        self.assertEqual(self.before_marker(watcher, self.user(b, "m")), [])

    def test_redis_restarted_empty_is_refilled_and_no_name_is_given_twice(self):
        a, b = self.node("A"), self.node("B")
        x, y = self.user(a, "x"), self.user(b, "y")
        self.redis.restart()
        taker = self.client(b)
        taker.send("LOGIN x")
        taker.expect("ERR username-taken")
        x.send("WHO")
        x.expect("USER x", "USER y")
        x.send("MSG after")
        wait_line(y, "MSG x after", 10)
        self.user(b, "newname")                    # once every node re-registered

    def test_redis_unreachable_at_start_delays_listening(self):
        proxy = self.proxy()
        proxy.cut()
        node = self.launched(Server("--redis", proxy.url, "--node-id", "A",
                                    "--node-lease", LEASE, workers=1))
        node.wait_log("unreachable", timeout=10)
        time.sleep(1.0)                            # retrying, and saying so only once
        self.assertNotIn("listening on", node.log())
        self.assertEqual(node.log().count("unreachable"), 1, node.log())
        proxy.restore()
        node.wait_log("listening on", timeout=10)
        self.user(node, "late")
