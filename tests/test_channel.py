"""Unit tests of chatlib/channel.py over a real socket pair: frames cut and
joined in user space, batches of any size, backpressure and loss."""

import selectors
import unittest
from multiprocessing import Pipe

from support import UnitTestCase

from chatlib.channel import RECV_SIZE, Channel


class Pair(UnitTestCase):

    def setUp(self):
        super().setUp()
        a, b = Pipe()
        self.sel = selectors.DefaultSelector()
        self.got, self.lost = [], []
        self.left = Channel(a, self.sel, self.got.extend, lambda: self.lost.append("left"))
        self.right = Channel(b, self.sel, self.got.extend, lambda: self.lost.append("right"),
                             limit=1 << 16)
        self.addCleanup(self.sel.close)
        self.addCleanup(self.left.close)
        self.addCleanup(self.right.close)

    def pump(self, until, turns=10000):
        """Run the loop until ``until()`` holds."""
        for _ in range(turns):
            if until():
                return
            for key, mask in self.sel.select(1.0):
                key.data(mask)
        self.fail("condition not reached")

    def test_batches_arrive_whole_and_in_order(self):
        sent = [[("M", b"x" * n)] for n in (0, 1, 100, RECV_SIZE - 10, 3 * RECV_SIZE, 5)]
        for batch in sent:
            self.left.send(batch)
        self.pump(lambda: len(self.got) == len(sent))
        self.assertEqual(self.got, sent)
        self.assertEqual(self.left.frames_out, len(sent))

    def test_many_small_batches_in_one_read(self):
        sent = [[("K", i)] for i in range(5000)]
        for batch in sent:
            self.right.send(batch)
        self.pump(lambda: len(self.got) == len(sent))
        self.assertEqual(self.got, sent)

    def test_congested_until_the_peer_reads(self):
        self.left.set_reading(False)              # the left loop reads nothing
        big = [("M", b"y" * (1 << 20))]
        for _ in range(8):
            self.right.send(big)
        self.assertTrue(self.right.congested)     # more than 64 KiB pending
        self.left.set_reading(True)
        self.pump(lambda: len(self.got) == 8 and not self.right.congested)

    def test_what_a_peer_sent_before_it_went_is_read(self):
        """A send that finds the peer gone (EPIPE) must not drop what the
        peer had sent before it left: a retiring broker's last lines and
        acknowledgements (chatlib.upgrade)."""
        self.left.set_reading(False)
        self.right.set_reading(False)
        self.right.send([("A", 1)])
        self.right.send([("M", b"last")])
        self.left.send([("M", b"never read")])      # in the right's buffer, unread
        self.right.close()
        self.left.send([("M", b"too late")])        # fails: the peer is gone
        self.left.set_reading(True)
        self.pump(lambda: self.lost == ["left"])
        self.assertEqual(self.got, [[("A", 1)], [("M", b"last")]])

    def test_loss_is_reported_once(self):
        self.left.close()
        self.pump(lambda: self.lost == ["right"])
        self.right.send([("M", b"late")])         # a send after loss is dropped
        self.assertEqual(self.lost, ["right"])


if __name__ == "__main__":
    unittest.main()
