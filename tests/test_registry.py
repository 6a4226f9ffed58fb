"""The registry's scripts (chatlib/cluster/registry.py) run in a real redis-server.

The fencing token is checked inside each script: a command carrying a lease
value that is no longer the node's is refused by Redis itself, whatever the
node believes. These tests call the scripts as a stale node would, with
nothing of the node's own logic in between.
"""

import socket

from support import RedisServer, TestCase, requires_redis

from chatlib.cluster import registry
from chatlib.cluster.resp import Parser, encode

INFO = "127.0.0.1 40000 0 0"     # the address of the user, for P:info
P = "t"
MAXLEN = registry.STREAM_MAXLEN
LEASE_MS = 60000


@requires_redis
class FencingToken(TestCase):
    def setUp(self):
        super().setUp()
        redis = RedisServer().start()
        self.addCleanup(redis.stop)
        self.sock = socket.create_connection(("127.0.0.1", redis.port), timeout=5)
        self.addCleanup(self.sock.close)
        self.parser = Parser()

    def call(self, *args):
        self.sock.sendall(encode(*args))
        while True:
            replies = self.parser.feed(self.sock.recv(65536))
            if replies:
                return replies[0]

    def script(self, script, *args):
        return self.call("EVAL", script.source, 0, *args)

    def join(self, lease, users=(), mode="", first="1"):
        args = [P, "A", lease, LEASE_MS, MAXLEN, "epoch1", "", mode, first]
        for key, owner in users:
            args += [key, owner, key, 1]
        return self.script(registry.JOIN, *args)

    def publish(self, lease, data=b"lines"):
        return self.script(registry.PUBLISH, P, "A", lease, MAXLEN, data, 0)

    def entries(self):
        return self.call("XLEN", P + ":bus")

    def test_a_command_with_an_old_lease_value_is_refused(self):
        self.assertEqual(self.join("run1.a")[0], b"ok")
        self.assertGreater(self.script(registry.CLAIM, P, "A", "run1.a", "ada", "Ada", "A 0 1", INFO), 0)
        self.assertEqual(self.join("run1.b", [("ada", "A 0 1")], first="0")[5], 0)
        before = self.entries()
        self.assertEqual(self.publish("run1.a"), b"lapsed")
        self.assertEqual(self.script(registry.CLAIM, P, "A", "run1.a", "bob", "bob", "A 0 2", INFO), -1)
        self.assertEqual(self.script(registry.DM, P, "A", "run1.a", MAXLEN, "ada", b"x"), -1)
        self.assertEqual(self.script(registry.LEAVE, P, "A", "run1.a", MAXLEN), 0)
        self.assertEqual(self.entries(), before)
        self.assertEqual(self.publish("run1.b"), b"ok")
        self.assertEqual(self.entries(), before + 1)

    def test_a_lease_that_ran_out_is_refused_even_if_nobody_reaped_the_node(self):
        self.join("run1.a")
        self.script(registry.CLAIM, P, "A", "run1.a", "ada", "Ada", "A 0 1", INFO)
        self.call("DEL", P + ":lease:A")                  # as when it expires
        self.assertEqual(self.script(registry.HEARTBEAT, P, "A", "run1.a", LEASE_MS, "epoch1",
                                     MAXLEN, LEASE_MS * 3, ""), [b"lapsed"])
        self.assertEqual(self.publish("run1.a"), b"lapsed")
        # Joining again: the node is reaped (its users announced gone), and
        # gets none of them back: they are all conflicts, for it to close.
        status, _, _, keys, conflicts, lapsed, _, _ = self.join("run1.b", [("ada", "A 0 1")],
                                                          first="0")
        self.assertEqual((status, keys, conflicts, lapsed), (b"ok", [], [b"ada"], 1))
        last = self.call("XREVRANGE", P + ":bus", "+", "-", "COUNT", 1)[0][1]
        self.assertEqual(last, [b"o", b"reaper", b"l", b"Ada"])

    def test_a_restarted_broker_releases_what_its_workers_no_longer_hold(self):
        self.join("run1.a")
        for n, key in enumerate(("ada", "bob")):
            self.script(registry.CLAIM, P, "A", "run1.a", key, key, "A 0 %d" % n, INFO)
        reply = self.join("run1.b", [("ada", "A 0 0")], first="1")    # bob's worker died
        self.assertEqual((reply[0], reply[4], reply[5]), (b"ok", [], 0))
        self.assertEqual(self.call("HKEYS", P + ":users"), [b"ada"])
        last = self.call("XREVRANGE", P + ":bus", "+", "-", "COUNT", 1)[0][1]
        self.assertEqual(last, [b"o", b"A", b"l", b"bob"])

    def test_another_run_of_the_same_id_is_a_duplicate(self):
        self.join("run1.a")
        self.assertEqual(self.join("run2.a")[0], b"duplicate")
