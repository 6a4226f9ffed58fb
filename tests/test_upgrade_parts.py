"""Unit tests of the upgrade's parts: a connection's state as data and back,
the hand-over pipe over a socket pair, what a worker's link gives its
successor, and the options of ``ctl upgrade``."""

import socket
import threading
import unittest

from support import UnitTestCase

from chatlib import config, link
from chatlib.connection import Client
from chatlib.delivery import BrokerLink, Inbound
from chatlib.protocol import TOO_LONG
from chatlib.telnet import INTERRUPT, Answer
from chatlib.upgrade import handover, state

MAX_LINE = 64


class StateRecord(UnitTestCase):

    def client(self):
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        c = Client(a, (7 << 20) + 1, "192.0.2.7", MAX_LINE, 100.0, 5)
        return c, b

    def test_every_field_comes_back(self):
        c, _ = self.client()
        c.name, c.name_b, c.login_stamp, c.logged_in_at = "ada", b"ada", 42, 1.5e9
        self.assertEqual(c.reader.feed(b"MSG one\nMSG hel"), [b"MSG one"])
        c.held = [b"WHO", TOO_LONG, Answer(b"\xff\xfc\x01"), INTERRUPT]
        c.out = [b"MSG bob hi\n", b"MSG bob th"]
        c.out_bytes, c.midline = 21, True
        c.last_line, c.tokens, c.refilled, c.throttled_since = 101.0, 2.5, 100.5, 99.0
        c.waiting, c.request = True, (link.WHO, c.cid)
        c.bytes_in, c.bytes_out = 30, 40
        fields = state.record(c)
        d = state.client(fields, socket.socket(), MAX_LINE, 5)
        self.addCleanup(d.sock.close)
        for name in ("cid", "ip", "name", "name_b", "login_stamp", "logged_in_at", "held",
                     "out_bytes", "midline", "connected", "last_line", "tokens", "refilled",
                     "throttled_since", "waiting", "request", "bytes_in", "bytes_out"):
            self.assertEqual(getattr(d, name), getattr(c, name), name)
        self.assertEqual(d.out, [b"MSG bob hi\nMSG bob th"])
        self.assertIsNone(d.relayed_port)
        self.assertEqual(state.record(c, 5555)["relayed_port"], 5555)   # relayed from now on
        self.assertEqual(d.reader.feed(b"lo\n"), [b"MSG hello"])   # the half line goes on

    def test_a_line_too_long_stays_too_long(self):
        c, _ = self.client()
        c.reader.feed(b"x" * (MAX_LINE + 5))                     # discarding till its end
        d = state.client(state.record(c), socket.socket(), MAX_LINE, 5)
        self.addCleanup(d.sock.close)
        self.assertEqual(d.reader.feed(b"yy\nPING\n"), [TOO_LONG, b"PING"])

    def test_plain_data_only(self):
        """What the new code reads must not depend on the old code's classes."""
        c, _ = self.client()
        c.held = [TOO_LONG, Answer(b"x"), INTERRUPT, b"MSG a"]
        plain = (type(None), bool, int, float, str, bytes, tuple, list)

        def check(value):
            if isinstance(value, dict):
                for item in value.values():
                    check(item)
            elif isinstance(value, (tuple, list)):
                for item in value:
                    check(item)
            else:
                self.assertIsInstance(value, plain)
        check(state.record(c, 4000))


class HandOver(UnitTestCase):

    def test_descriptors_and_records_in_chunks(self):
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        pairs = [socket.socketpair() for _ in range(handover.CHUNK * 2 + 3)]
        for pair in pairs:
            self.addCleanup(pair[0].close)
            self.addCleanup(pair[1].close)
        sent = [({"k": k}, pair[0].fileno()) for k, pair in enumerate(pairs)]
        sender = threading.Thread(target=handover.send, args=(ours, {"version": 1}, sent))
        sender.start()
        header, received = handover.receive(theirs)
        sender.join()
        self.assertEqual(header, {"version": 1, "count": len(pairs)})
        self.assertEqual([fields["k"] for fields, _ in received], list(range(len(pairs))))
        for (fields, fd), pair in zip(received, pairs):
            with socket.socket(fileno=fd) as moved:          # the same connection
                moved.sendall(b"%d" % fields["k"])
                self.assertEqual(pair[1].recv(16), b"%d" % fields["k"])

    def test_a_sender_gone_half_way(self):
        ours, theirs = socket.socketpair()
        self.addCleanup(theirs.close)
        ours.sendall(b"\x00\x00\x00\x05\x00\x00\x00\x00ab")
        ours.close()
        with self.assertRaises(EOFError):
            handover.receive(theirs)


class LinkHandedOver(UnitTestCase):

    def test_what_the_broker_did_not_acknowledge(self):
        broker = BrokerLink(10)
        msg, bye, who = (link.BROADCAST, b"MSG a x\n"), (link.BYE, 3, "a", 1), (link.WHO, 4)
        broker.sent.seal([msg, who])              # acknowledged below
        later = (link.BROADCAST, b"MSG a y\n")
        broker.sent.seal([later])
        broker.outbox = [bye, who]
        broker.sent.acknowledged(broker.sent.unacked[0][0])
        self.assertEqual(broker.unrouted(), [later, bye])    # requests go again from clients

    def test_batches_seen_are_merged(self):
        seen = Inbound()
        seen.is_new(0, 10)
        seen.merge({0: 7, 1: 5})
        self.assertEqual((seen.is_new(0, 9), seen.is_new(1, 5), seen.is_new(1, 6)),
                         (False, False, True))


class UpgradeOptions(UnitTestCase):

    def test_new_values_win_and_the_command_line_is_kept(self):
        running = config.parse_args(["--port", "0", "--workers", "2", "--rate", "5"])
        running.node_id = "filled-by-the-supervisor"
        new = config.upgraded(running, ["--workers", "8"])
        self.assertEqual((new.workers, new.rate, new.node_id), (8, 5, "filled-by-the-supervisor"))
        self.assertEqual(new.argv, ["--port", "0", "--workers", "2", "--rate", "5",
                                    "--workers", "8"])
        self.assertEqual(running.workers, 2)

    def test_what_it_listens_on_is_refused(self):
        running = config.parse_args(["--port", "0"])
        for words in (["--port", "1"], ["--host", "::1"], ["--state-dir", "/x"],
                      ["--start-method", "spawn"], ["--help"], ["--nope"], ["--workers", "0"]):
            with self.assertRaises(config.OptionError, msg=words):
                config.upgraded(running, words)

    def test_an_option_new_since_is_at_its_default(self):
        old = config.parse_args(["--port", "0"])
        del old.rate
        self.assertEqual(config.completed(old).rate, config.parse_args([]).rate)


if __name__ == "__main__":
    unittest.main()
