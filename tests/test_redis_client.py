"""Tests of chatlib/cluster/redis_client.py against a real redis-server.

A real ``selectors`` loop drives the clients, as the broker's does, until a
condition holds or a deadline passes: no sleeping and hoping. Outages are
real too: redis killed and restarted, never started, or stopped (SIGSTOP).
"""

import logging
import os
import select
import selectors
import shutil
import signal
import socket
import tempfile
import time
import unittest
from unittest import mock

from support import (RedisServer, TestCase, UnitTestCase, free_port, requires_redis,
                     self_signed)

from chatlib.cluster.redis_client import RedisClient, Script, parse_url
from chatlib.cluster.resp import ConnectionLost, RedisError

LOG = logging.getLogger("test_redis_client")
LOG.addHandler(logging.NullHandler())          # quiet, but for assertLogs
LOG.propagate = False
PASSWORD = "s3cret-Pw"
ECHO = Script("return {KEYS[1], ARGV[1]}")


class Loop(TestCase):
    """A selectors loop, and clients on it closed when the test ends."""

    def setUp(self):
        super().setUp()
        self.sel = selectors.DefaultSelector()
        self.addCleanup(self.sel.close)
        self.clients = []
        self.events = []              # "up", "down" and replies, as they come

    def client(self, url, wait_up=True, **kwargs):
        client = RedisClient(parse_url(url), self.sel, "test", log=LOG,
                             on_up=lambda: self.events.append("up"),
                             on_down=lambda: self.events.append("down"), **kwargs)
        self.clients.append(client)
        self.addCleanup(client.close)
        client.start()
        if wait_up:
            self.pump(lambda: client.up)
        return client

    def pump(self, until, timeout=5.0):
        """Run the loop, as an owner does, until ``until()`` holds."""
        deadline = time.monotonic() + timeout
        while True:
            for client in self.clients:
                client.flush()
            if until():
                return
            now = time.monotonic()
            if now >= deadline:
                self.fail("condition not reached within %.1f s" % timeout)
            wakeups = [t for t in (c.next_wakeup() for c in self.clients) if t is not None]
            for key, mask in self.sel.select(max(0.0, min([deadline] + wakeups) - now)):
                key.data(mask)
            now = time.monotonic()
            for client in self.clients:
                client.tick(now)

    def run_command(self, client, *args, **kwargs):
        """Call one command and pump until its reply, which it returns."""
        got = []
        client.call(got.append, *args, **kwargs)
        self.pump(lambda: got)
        return got[0]

    def note(self, tag):
        """A callback that notes its reply's type in :attr:`events`."""
        return lambda reply: self.events.append((tag, type(reply).__name__))


@requires_redis
class Commands(Loop):
    """One redis for all: the tests use keys of their own."""

    @classmethod
    def setUpClass(cls):
        cls.redis = RedisServer().start()
        cls.addClassCleanup(cls.redis.stop)

    def test_a_thousand_commands_in_one_turn_answer_in_order_in_few_sends(self):
        client = self.client(self.redis.url)
        got = []
        real_send = socket.socket.send
        sends = []

        def counting_send(sock, data, *flags):
            sends.append(len(data))
            return real_send(sock, data, *flags)
        with mock.patch.object(socket.socket, "send", counting_send):
            for _ in range(1000):
                client.call(got.append, "INCR", "counter")
            self.assertEqual(client.pending, 1000)
            self.assertGreater(client.buffered_bytes, 20000)
            self.pump(lambda: len(got) == 1000)
        self.assertEqual(got, list(range(1, 1001)))
        self.assertLessEqual(len(sends), 3)
        self.assertEqual((client.pending, client.buffered_bytes), (0, 0))

    def test_big_values_both_ways(self):
        client = self.client(self.redis.url)
        value = os.urandom(4 << 20)
        self.assertEqual(self.run_command(client, "SET", "big", value), "OK")
        self.assertEqual(self.run_command(client, "GET", "big"), value)

    def test_an_error_is_a_reply_like_any_other(self):
        client = self.client(self.redis.url)
        got = []
        client.call(got.append, "NOSUCHCOMMAND", 1)
        client.call(got.append, "PING")
        self.pump(lambda: len(got) == 2)
        self.assertIsInstance(got[0], RedisError)
        self.assertEqual(got[0].code, "ERR")
        self.assertEqual(got[1], "PONG")

    def test_scripts_are_loaded_before_up(self):
        client = self.client(self.redis.url, scripts=[ECHO])
        self.assertEqual(self.run_command(client, "SCRIPT", "EXISTS", ECHO.sha), [1])
        got = []
        client.evalsha(got.append, ECHO, ["k"], ["v"])
        self.pump(lambda: got)
        self.assertEqual(got, [[b"k", b"v"]])

    def test_a_flushed_script_is_loaded_again_transparently(self):
        client = self.client(self.redis.url, scripts=[ECHO])
        self.redis.command("SCRIPT", "FLUSH")            # from another connection
        unknown = Script("return 'never loaded'")
        got = []
        client.evalsha(got.append, ECHO, ["k1"], ["v1"])
        client.evalsha(got.append, ECHO, ["k2"], [2])
        client.evalsha(got.append, unknown, [], [])
        self.pump(lambda: len(got) == 3)
        self.assertCountEqual(got, [[b"k1", b"v1"], [b"k2", b"2"], b"never loaded"])
        self.assertEqual(self.events, ["up"])

    def test_the_database_of_the_url_is_selected(self):
        in_3 = self.client(self.redis.url[:-2] + "/3")
        self.assertEqual(self.run_command(in_3, "SET", "only-in-3", "x"), "OK")
        self.assertIn("keys=1", self.redis.info("keyspace")["db3"])
        in_0 = self.client(self.redis.url)
        self.assertIsNone(self.run_command(in_0, "GET", "only-in-3"))
        self.assertEqual(self.run_command(in_3, "GET", "only-in-3"), b"x")

    def test_block_is_added_to_the_reply_timeout(self):
        client = self.client(self.redis.url, reply_timeout=0.2)
        self.assertIsNone(self.run_command(client, "BLPOP", "empty", 0.5, block=1.0))
        self.assertEqual(self.events, ["up"])

    def test_commands_are_refused_until_up(self):
        client = self.client(self.redis.url, wait_up=False)
        with self.assertRaisesRegex(RuntimeError, "down"):
            client.call(print, "PING")
        self.pump(lambda: client.up)
        self.assertEqual(self.run_command(client, "PING"), "PONG")

    def test_close_answers_what_is_pending_and_lets_go(self):
        client = self.client(self.redis.url)
        client.call(self.note("blpop"), "BLPOP", "empty", 0, block=60)
        self.pump(lambda: client.buffered_bytes == 0)
        client.call(self.note("ping"), "PING")
        client.close()
        self.assertEqual(self.events, ["up", ("blpop", "ConnectionLost"),
                                       ("ping", "ConnectionLost")])
        self.assertIsNone(client.next_wakeup())
        self.assertEqual(len(self.sel.get_map()), 0)


@requires_redis
class Outages(Loop):
    """A redis each, which the tests kill, stop and restart."""

    def redis(self, port=None):
        redis = RedisServer(port=port).start()
        self.addCleanup(redis.stop)
        return redis

    def test_a_restart_fails_what_is_pending_then_reconnects(self):
        redis = self.redis()
        client = self.client(redis.url)
        client.call(self.note("blpop"), "BLPOP", "empty", 0, block=60)
        self.pump(lambda: client.buffered_bytes == 0)
        redis.restart()
        client.call(self.note("ping"), "PING")
        for key, mask in self.sel.select(5.0):            # the EOF, before any flush:
            key.data(mask)                                # the PING is only buffered
        self.assertFalse(client.up)
        self.pump(lambda: self.events.count("up") == 2)
        self.assertEqual(self.events, ["up", ("blpop", "ConnectionLost"),
                                       ("ping", "ConnectionLost"), "down", "up"])
        self.assertEqual(client.pending, 0)               # nothing carried over
        self.assertEqual(self.run_command(client, "PING"), "PONG")

    def test_unreachable_at_start_logs_once_then_connects(self):
        port = free_port()
        with self.assertLogs(LOG, "DEBUG") as logs:
            client = self.client("redis://127.0.0.1:%d/0" % port, wait_up=False)
            self.pump(lambda: len(logs.records) >= 3)
            self.assertRaises(RuntimeError, client.call, print, "PING")
            self.redis(port)
            self.pump(lambda: client.up)
        levels = [r.levelname for r in logs.records]
        self.assertEqual(levels.count("WARNING"), 1)
        self.assertEqual(levels.count("INFO"), 1)
        self.assertEqual(logs.records[0].getMessage(),
                         "test: redis at redis://127.0.0.1:%d/0 unreachable: "
                         "Connection refused; retrying" % port)
        self.assertEqual(logs.records[-1].getMessage(),
                         "test: redis connection up (redis://127.0.0.1:%d/0)" % port)
        self.assertEqual(self.events, ["up"])

    def test_no_reply_in_time_is_an_outage(self):
        redis = self.redis()
        client = self.client(redis.url, reply_timeout=0.3)
        self.addCleanup(os.kill, redis.proc.pid, signal.SIGCONT)
        os.kill(redis.proc.pid, signal.SIGSTOP)
        got = []
        started = time.monotonic()
        client.call(got.append, "PING")
        self.pump(lambda: got)
        self.assertGreaterEqual(time.monotonic() - started, 0.3)
        self.assertIsInstance(got[0], ConnectionLost)
        self.assertEqual(str(got[0]), "no reply within 0.3 s")
        self.assertEqual(self.events, ["up", "down"])
        os.kill(redis.proc.pid, signal.SIGCONT)
        self.pump(lambda: client.up)
        self.assertEqual(self.events, ["up", "down", "up"])

    def test_a_reply_that_came_while_the_owner_did_not_run_is_no_outage(self):
        """The owner's process was stopped (SIGSTOP, a paused VM) past the
        reply timeout: Redis answered meanwhile, and the reply is taken."""
        client = self.client(self.redis().url, reply_timeout=0.3)
        got = []
        client.call(got.append, "PING")
        client.flush()
        # The owner's loop does not run: the reply waits in the socket while
        # the reply timeout passes.
        self.assertTrue(select.select([client.sock], [], [], 5)[0], "no reply at all")
        time.sleep(0.5)
        client.tick(time.monotonic())
        self.assertEqual(got, ["PONG"])
        self.assertTrue(client.up)
        self.assertEqual(self.events, ["up"])

    def test_bytes_that_are_not_resp_drop_the_connection(self):
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        listener.settimeout(5)
        with self.assertLogs(LOG, "WARNING") as logs:
            self.client("redis://127.0.0.1:%d" % listener.getsockname()[1], wait_up=False)
            peer, _ = listener.accept()
            self.addCleanup(peer.close)
            peer.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            self.pump(lambda: logs.records)
        self.assertIn("unreachable: protocol error: unknown reply type b'H'; retrying",
                      logs.records[0].getMessage())


@requires_redis
class Auth(Loop):

    @classmethod
    def setUpClass(cls):
        cls.redis = RedisServer(password=PASSWORD).start()
        cls.addClassCleanup(cls.redis.stop)

    def test_password_in_the_url(self):
        client = self.client(self.redis.url)
        self.assertEqual(self.run_command(client, "PING"), "PONG")

    def test_user_and_password(self):
        self.client("redis://default:%s@127.0.0.1:%d/0" % (PASSWORD, self.redis.port))

    def test_password_from_the_environment(self):
        address = parse_url("redis://127.0.0.1:%d/0" % self.redis.port, password_env=PASSWORD)
        client = RedisClient(address, self.sel, "test", log=LOG)
        self.clients.append(client)
        self.addCleanup(client.close)
        client.start()
        self.pump(lambda: client.up)

    def assert_refused(self, url, error):
        """The client logs one error (without the password) and retries."""
        with self.assertLogs(LOG, "DEBUG") as logs:
            client = self.client(url, wait_up=False)
            self.pump(lambda: len(logs.records) >= 3)
        self.assertFalse(client.up)
        self.assertEqual([r.levelname for r in logs.records][:3], ["ERROR", "DEBUG", "DEBUG"])
        self.assertIn(error, logs.records[0].getMessage())
        for record in logs.records:
            self.assertNotIn("Bad-Pw", record.getMessage())
        self.assertEqual(self.events, [])

    def test_a_wrong_password_is_an_error_logged_once(self):
        self.assert_refused("redis://:Bad-Pw@127.0.0.1:%d/0" % self.redis.port,
                            "unreachable: AUTH refused: WRONGPASS")

    def test_no_password_is_an_error_logged_once(self):
        self.assert_refused("redis://127.0.0.1:%d/0" % self.redis.port,
                            "unreachable: PING refused: NOAUTH")


@requires_redis
class Tls(Loop):
    """rediss://: a Redis with a throw-away certificate, trusted through
    ``$SSL_CERT_FILE`` as an operator would point at a private CA."""

    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="chat-rediss-")
        cls.addClassCleanup(shutil.rmtree, cls.dir, True)
        cls.cert = self_signed(cls.dir)
        cls.redis = RedisServer(password=PASSWORD, tls=cls.cert).start()
        cls.addClassCleanup(cls.redis.stop)

    def test_commands_and_scripts_over_tls(self):
        with mock.patch.dict(os.environ, {"SSL_CERT_FILE": self.cert[0]}):
            client = self.client(self.redis.tls_url, scripts=[ECHO])
        got = []
        for i in range(500):
            client.call(got.append, "SET", "tls-%d" % i, "x" * 3000)
        client.evalsha(got.append, ECHO, ["k"], ["v"])
        client.call(got.append, "MGET", *["tls-%d" % i for i in range(500)])
        self.pump(lambda: len(got) == 502)
        self.assertEqual(got[:500], ["OK"] * 500)
        self.assertEqual(got[500], [b"k", b"v"])
        self.assertEqual(got[501], [b"x" * 3000] * 500)

    def test_an_untrusted_certificate_is_refused_and_logged_once(self):
        with self.assertLogs(LOG, "DEBUG") as logs:
            client = self.client(self.redis.tls_url, wait_up=False)
            self.pump(lambda: len(logs.records) >= 2)
        self.assertFalse(client.up)
        self.assertIn("CERTIFICATE_VERIFY_FAILED", logs.records[0].getMessage())
        self.assertEqual(logs.records[1].levelname, "DEBUG")

    def test_reconnects_after_a_restart(self):
        with mock.patch.dict(os.environ, {"SSL_CERT_FILE": self.cert[0]}):
            client = self.client(self.redis.tls_url)
        self.redis.restart()
        self.pump(lambda: self.events.count("up") == 2, timeout=10)
        self.assertEqual(self.run_command(client, "PING"), "PONG")


class ParseUrl(UnitTestCase):

    def test_defaults(self):
        self.assertEqual(parse_url("redis://localhost"),
                         ("localhost", 6379, None, None, 0, False))

    def test_rediss_is_tls(self):
        address = parse_url("rediss://:Pw1@h:6380/1")
        self.assertTrue(address.tls)
        self.assertEqual(str(address), "rediss://:***@h:6380/1")

    def test_every_part(self):
        address = parse_url("redis://chat%40eu:p%3Ass%2Fw@Redis.example:7000/3")
        self.assertEqual((address.host, address.port, address.username, address.password,
                          address.db), ("redis.example", 7000, "chat@eu", "p:ss/w", 3))

    def test_ipv6(self):
        address = parse_url("redis://[::1]:6380")
        self.assertEqual((address.host, address.port), ("::1", 6380))
        self.assertEqual(str(address), "redis://[::1]:6380/0")

    def test_the_password_from_the_environment_only_when_the_url_has_none(self):
        self.assertEqual(parse_url("redis://h", password_env="env").password, "env")
        self.assertEqual(parse_url("redis://u@h", password_env="env")[2:4], ("u", "env"))
        self.assertEqual(parse_url("redis://:url@h", password_env="env").password, "url")
        self.assertIsNone(parse_url("redis://h", password_env="").password)

    def test_the_password_is_never_shown(self):
        for url, env, shown in (("redis://:Pw1@h:1/2", None, "redis://:***@h:1/2"),
                                ("redis://user:Pw1@h", None, "redis://user:***@h:6379/0"),
                                ("redis://h", "Pw1", "redis://:***@h:6379/0"),
                                ("redis://user@h", None, "redis://user@h:6379/0")):
            address = parse_url(url, password_env=env)
            with self.subTest(url=url):
                self.assertEqual(str(address), shown)
                self.assertEqual(repr(address), shown)
                self.assertNotIn("Pw1", repr([address]) + "%s %r" % (address, address))

    def test_malformed_urls(self):
        for url, message in (("localhost:6379", "must start with redis://"),
                             ("http://h", "must start with redis://"),
                             ("redis://:Pw1@h:port", "the port must be a number"),
                             ("redis://:Pw1@h:0", "the port must be a number"),
                             ("redis://:Pw1@h:65536", "the port must be a number"),
                             ("redis://:Pw1@h/one", "the database must be a number"),
                             ("redis://:Pw1@h/-1", "the database must be a number"),
                             ("redis://:Pw#1@h", "nothing may follow"),
                             ("redis://:Pw1@/0", "no host"),
                             ("redis://:Pw1@[::1", "Invalid IPv6 URL")):
            with self.subTest(url=url):
                with self.assertRaisesRegex(ValueError, "^redis URL: .*" + message) as caught:
                    parse_url(url)
                self.assertNotIn("Pw", str(caught.exception))
                self.assertNotIn("\n", str(caught.exception))


if __name__ == "__main__":
    unittest.main()
