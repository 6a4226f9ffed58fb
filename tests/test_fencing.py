"""Cluster mode: one name is never held by two live users, whatever freezes.

Black-box, against real ``redis-server`` processes. A node's process group is
frozen with SIGSTOP for longer than its lease, so that the others announce
its users gone and hand their names out again, then resumed in each order a
real pause can end in (a stopped terminal job, a paused VM, a long garbage
collection). And Redis fails over to a replica that missed the last writes
(replication is asynchronous), through TCP relays that stall and move like a
network does.

What must hold: a node whose lease ran out serves its users no further line
(they get ``ERR unavailable`` and are closed), nothing they sent after
reaches anyone, and a name taken on one node is never granted on another.
"""

import os
import signal
import time

from support import FaultProxy, RedisServer, TestCase, requires_redis, wait_line

LEASE = 2.0                 # seconds: short, so that faults play out quickly
HEARTBEAT_TIMEOUT = 2       # the supervisor's, so that a stopped broker is replaced soon


@requires_redis
class FencingCase(TestCase):
    timeout = 90

    def redis(self, *args):
        server = RedisServer(extra_args=args).start()
        self.addCleanup(server.stop)
        return server

    def node(self, node_id, url):
        return self.server("--redis", url, "--node-id", node_id, "--node-lease", LEASE,
                           "--heartbeat-timeout", HEARTBEAT_TIMEOUT, workers=1)

    def relay(self, port):
        proxy = FaultProxy(port)
        self.addCleanup(proxy.close)
        return proxy


class TestFrozenNode(FencingCase):
    """A node frozen past its lease: ``frozen`` holds ``zz1`` when it stops;
    the other node announces it gone and grants ``ZZ1``; then ``frozen``
    runs again, its processes in the order given."""

    def setUp(self):
        super().setUp()
        url = self.redis().url
        self.live, self.frozen = self.node("A", url), self.node("B", url)
        self.watch = self.client(self.live, "watch")
        self.stale = self.client(self.frozen, "zz1")

    def freeze(self):
        os.killpg(self.frozen.proc.pid, signal.SIGSTOP)
        self.addCleanup(_resume, self.frozen.proc.pid)
        wait_line(self.watch, "INFO zz1 disconnected", LEASE + 4)
        self.taker = self.client(self.live, "ZZ1")
        # Waiting in the frozen node's socket buffers: the worst case.
        self.stale.send("MSG I am the real zz1", "PING")

    def check_one_zz1(self):
        self.assertEqual(self.stale.expect_closed(timeout=20), ["ERR unavailable"])
        late = self.client(self.frozen, "late")         # serving again
        late.send("MSG marker")
        for user in (self.watch, self.taker):
            self.assertEqual(user.lines_until("MSG late marker"), [])
            user.send("WHO")
            user.expect("USER watch", "USER ZZ1", "USER late")
        retry = self.client(self.frozen)
        retry.send("LOGIN zz1")
        retry.expect("ERR username-taken")

    def test_the_worker_resumes_first_and_the_broker_is_replaced(self):
        roles = self.frozen.roles()
        self.freeze()
        os.kill(roles["chat-worker-0"], signal.SIGCONT)
        time.sleep(0.5)
        for pid in (self.frozen.proc.pid, roles["chat-acceptor"]):
            os.kill(pid, signal.SIGCONT)
        self.frozen.replacement("chat-broker", roles["chat-broker"], HEARTBEAT_TIMEOUT + 10)
        self.check_one_zz1()

    def test_the_broker_resumes_first_and_the_worker_after(self):
        roles = self.frozen.roles()
        self.freeze()
        for pid in (self.frozen.proc.pid, roles["chat-acceptor"], roles["chat-broker"]):
            os.kill(pid, signal.SIGCONT)
        time.sleep(0.5)
        os.kill(roles["chat-worker-0"], signal.SIGCONT)
        self.check_one_zz1()

    def test_the_whole_group_resumes_at_once(self):
        self.freeze()
        os.killpg(self.frozen.proc.pid, signal.SIGCONT)
        self.check_one_zz1()


def _resume(pgid):
    try:
        os.killpg(pgid, signal.SIGCONT)
    except OSError:
        pass


class TestFailover(FencingCase):
    def test_a_replica_that_missed_a_login_never_grants_that_name_again(self):
        """The replica is fed through a relay that stalls (a partition)
        before ``carol`` logs in; the master dies with its last writes, the
        replica is promoted, and the nodes' relay moves to it."""
        master = self.redis()
        feed = self.relay(master.port)
        replica = self.redis("--replicaof", "127.0.0.1", feed.port)
        front = self.relay(master.port)
        a, b = self.node("A", front.url), self.node("B", front.url)
        alice, bob = self.client(a, "alice"), self.client(b, "bob")
        deadline = time.monotonic() + 10
        while replica.command("HGET", "chat:users", "bob").startswith(b"$-1"):
            self.assertLess(time.monotonic(), deadline, "the replica never caught up")
            time.sleep(0.05)
        feed.stall()
        carol = self.client(a, "carol")
        master.kill()
        feed.cut()
        self.assertTrue(replica.command("REPLICAOF", "NO", "ONE").startswith(b"+OK"))
        front.move(replica.port)
        contender = self.client(b)
        contender.send("LOGIN carol")
        self.assertEqual(contender.read_line(timeout=LEASE + 10), "ERR username-taken")
        carol.send("MSG still here")
        for user in (alice, bob):
            wait_line(user, "MSG carol still here", 10)
        alice.send("WHO")
        alice.expect("USER alice", "USER bob", "USER carol")
