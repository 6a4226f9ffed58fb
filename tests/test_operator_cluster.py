"""The operator's hand across a cluster, black-box: commands made on node A
over its control socket, felt by users on node B; bans that survive a
restart of Redis (empty) and of a node.
"""

import os

from support import (IO_TIMEOUT, RedisServer, TestCase, bound_client, control, requires_redis,
                     said, wait_line, wait_until)

LEASE = 3.0


@requires_redis
class OperatorClusterTest(TestCase):
    timeout = 90

    def setUp(self):
        super().setUp()
        self.redis = RedisServer().start()
        self.addCleanup(self.redis.stop)
        self.dir = self.tmpdir("operator-cluster")

    def node(self, node_id):
        path = os.path.join(self.dir, node_id + ".sock")
        srv = self.server("--redis", self.redis.url, "--node-id", node_id,
                          "--node-lease", LEASE, "--control", path,
                          "--state-dir", os.path.join(self.dir, node_id), workers=1)
        srv.control = path
        return srv

    def ok(self, node, command):
        lines, last = control(node.control, command)
        self.assertEqual(last, "OK", "%s: %r" % (command, lines))
        return lines

    def test_moderation_made_on_a_is_felt_on_b(self):
        a, b = self.node("A"), self.node("B")
        ada = self.client(a, "ada")
        bob = self.client(b, "bob")
        cat = self.client(b, "cat")
        # users: both nodes' users, in login order, from either node
        lines = self.ok(a, "users")
        self.assertEqual([(line.split()[0], line.split()[1]) for line in lines],
                         [("ada", "node=A"), ("bob", "node=B"), ("cat", "node=B")])
        self.assertRegex(lines[1], r"^bob node=B from=127\.0\.0\.1:\d+ tls=no since=\S+Z")
        # announce
        self.ok(a, "announce restart at noon")
        ada.expect("NOTICE restart at noon")
        bob.expect("NOTICE restart at noon")
        cat.expect("NOTICE restart at noon")
        # mute, then unmute
        self.ok(a, "mute cat")
        wait_until(lambda: said(cat, "MSG hush") == ["ERR muted"])
        self.ok(a, "unmute cat")
        wait_until(lambda: said(cat, "MSG loud") == [])
        wait_line(ada, "MSG cat loud", IO_TIMEOUT)
        # kick
        self.ok(a, "kick bob be nice")
        self.assertEqual(bob.expect_closed()[-1:], ["ERR kicked be nice"])
        wait_line(ada, "INFO bob disconnected", IO_TIMEOUT)
        # ban by name
        self.ok(a, "ban cat")
        self.assertEqual(cat.expect_closed()[-1:], ["ERR banned"])
        wait_line(ada, "INFO cat disconnected", IO_TIMEOUT)
        again = self.client(b)
        again.send("LOGIN cat")
        self.assertEqual(again.expect_closed(), ["ERR banned"])
        ada.send("MSG marker")
        self.assertEqual(ada.barrier(), [])       # each INFO came once

    def test_bans_by_address_and_block_and_after_a_redis_restart(self):
        a, b = self.node("A"), self.node("B")
        two = bound_client(b.port, "127.0.0.2")
        self.addCleanup(two.close)
        two.login("two")
        three = bound_client(b.port, "127.0.3.3")
        self.addCleanup(three.close)
        three.login("three")
        self.ok(a, "ban 127.0.0.2 1h scraping")
        self.assertEqual(two.expect_closed()[-1:], ["ERR banned"])
        self.ok(a, "ban 127.0.3.0/24")
        self.assertEqual(three.expect_closed()[-1:], ["ERR banned"])
        refused = bound_client(b.port, "127.0.3.200")
        self.addCleanup(refused.close)
        self.assertEqual(refused.expect_closed(), ["ERR banned"])
        # Redis loses everything: the nodes give their bans back.
        self.redis.restart()
        for node in (a, b):
            node.wait_log("giving redis back this node's 2 moderation records")
        fresh = self.node("C")
        wait_until(lambda: [line.split()[1] for line in self.ok(fresh, "bans")]
                        == ["127.0.0.2", "127.0.3.0/24"])
        late = bound_client(fresh.port, "127.0.0.2")
        self.addCleanup(late.close)
        self.assertEqual(late.expect_closed(), ["ERR banned"])
        # An unban on one node holds everywhere, and after a restart of a node.
        self.ok(fresh, "unban 127.0.3.0/24")
        wait_until(lambda: len(self.ok(a, "bans")) == 1)
        b.restart()
        self.assertEqual([line.split()[1] for line in self.ok(b, "bans")], ["127.0.0.2"])
