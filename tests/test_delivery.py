"""Unit tests of chatlib/delivery.py: numbering, acknowledging, replaying
and deduplicating the batches between workers and broker."""

import unittest

from support import UnitTestCase

from chatlib import link
from chatlib.delivery import Inbound, Outbound, resent

MSG = (link.BROADCAST, b"MSG a hi\n")
BYE = (link.BYE, 3, "a", 17)
DM_FIRE = (link.DM, 3, "b", b"DM a x\n", False)
DM_AWAITED = (link.DM, 3, "zed", b"DM a x\n", True)
WHO = (link.WHO, 3)
LOGIN = (link.LOGIN, 4, "c", ("127.0.0.1", 40000, False), None)


class Resent(UnitTestCase):

    def test_users_lines_and_departures_only(self):
        self.assertEqual([e for e in (MSG, BYE, DM_FIRE, DM_AWAITED, WHO, LOGIN) if resent(e)],
                         [MSG, BYE, DM_FIRE])


class OutboundBatches(UnitTestCase):

    def setUp(self):
        super().setUp()
        self.out = Outbound()

    def test_numbers_grow_and_start_from_the_clock(self):
        first = self.out.seal([MSG])
        second = self.out.seal([])
        self.assertEqual(first[0], link.SEQ)
        self.assertEqual(second[1], first[1] + 1)
        self.assertGreater(Outbound().seal([])[1], second[1])   # a restarted worker

    def test_replay_keeps_each_batch_under_its_number(self):
        n1 = self.out.seal([MSG, WHO])[1]
        self.out.seal([LOGIN])                       # nothing to keep
        n3 = self.out.seal([DM_FIRE, DM_AWAITED, BYE])[1]
        self.assertEqual(self.out.replay(),
                         [(link.SEQ, n1), MSG, (link.SEQ, n3), DM_FIRE, BYE])

    def test_acknowledged_batches_are_forgotten(self):
        n1 = self.out.seal([MSG])[1]
        n2 = self.out.seal([BYE])[1]
        self.out.acknowledged(n1)
        self.assertEqual(self.out.replay(), [(link.SEQ, n2), BYE])
        self.out.acknowledged(n2 + 5)
        self.assertEqual(self.out.replay(), [])

    def test_replay_does_not_forget(self):
        n1 = self.out.seal([MSG])[1]
        self.out.replay()
        self.assertEqual(self.out.replay(), [(link.SEQ, n1), MSG])   # a second broker dies too


class InboundBatches(UnitTestCase):

    def test_a_batch_seen_before_is_dropped_per_sending_worker(self):
        routed = Inbound()
        self.assertTrue(routed.is_new(0, 100))
        self.assertTrue(routed.is_new(1, 50))       # another worker's numbers
        self.assertFalse(routed.is_new(0, 100))     # resent by a new broker
        self.assertFalse(routed.is_new(0, 99))
        self.assertTrue(routed.is_new(0, 101))

    def test_lines_from_no_batch_always_pass(self):
        routed = Inbound()
        self.assertTrue(routed.is_new(None, None))
        self.assertTrue(routed.is_new(None, None))


if __name__ == "__main__":
    unittest.main()
