"""Unit tests of flood control (chatlib/flood.py): the token bucket, the
throttled clients' wake-up times, and the grace before a flooder is cut.
The clock is the test's own: the module never reads one."""

import math
import unittest

from support import UnitTestCase

from chatlib.connection import Client
from chatlib.flood import FLOOD_GRACE, FloodControl

RATE, BURST = 10, 20


def client(cid=1, now=100.0):
    return Client(None, cid, "192.0.2.1", 4096, now, BURST)


class Bucket(UnitTestCase):

    def setUp(self):
        super().setUp()
        self.flood = FloodControl(RATE, BURST)

    def test_a_new_client_may_send_a_burst(self):
        c = client()
        self.assertEqual(self.flood.allowance(c, 100.0), BURST)

    def test_spent_tokens_come_back_at_the_rate(self):
        c = client()
        self.flood.spend(c, BURST)
        self.assertEqual(self.flood.allowance(c, 100.0), 0)
        self.assertEqual(self.flood.allowance(c, 100.25), 2)      # 0.25 s at 10/s
        self.assertEqual(self.flood.allowance(c, 100.35), 3)      # a fraction is kept
        self.assertEqual(self.flood.allowance(c, 1000.0), BURST)  # never above the burst

    def test_an_allowance_is_whole_lines_and_never_negative(self):
        c = client()
        self.flood.spend(c, BURST + 5)          # a client can run over (its QUIT)
        self.assertEqual(self.flood.allowance(c, 100.0), 0)
        self.assertEqual(self.flood.allowance(c, 100.25), 0)      # -5 + 2.5
        self.assertEqual(self.flood.allowance(c, 100.75), 2)      # -2.5 + 5

    def test_a_throttled_client_wakes_when_a_token_is_back(self):
        c = client(cid=7)
        self.assertEqual(self.flood.next_due(), math.inf)
        self.flood.spend(c, self.flood.allowance(c, 100.0))
        self.assertTrue(self.flood.throttle(c, 100.0))
        self.assertAlmostEqual(self.flood.next_due(), 100.0 + 1 / RATE)
        self.assertEqual(list(self.flood.due(100.05)), [])
        self.assertEqual(list(self.flood.due(100.1)), [7])
        self.assertEqual(self.flood.next_due(), math.inf)

    def test_due_clients_come_in_time_order(self):
        early, late = client(cid=1), client(cid=2)
        late.tokens, early.tokens = 0.0, 0.5
        self.flood.throttle(late, 100.0)        # due at 100.1
        self.flood.throttle(early, 100.0)       # due at 100.05
        self.assertEqual(list(self.flood.due(101.0)), [1, 2])

    def test_a_client_throttled_again_while_due_ones_run_waits(self):
        c = client(cid=3)
        c.tokens = 0.0
        self.flood.throttle(c, 100.0)
        woken = []
        for cid in self.flood.due(100.1):
            woken.append(cid)
            self.flood.throttle(c, 100.1)       # runs, is over again: later
        self.assertEqual(woken, [3])
        self.assertAlmostEqual(self.flood.next_due(), 100.2)

    def test_over_the_rate_for_longer_than_the_grace_is_cut(self):
        c = client()
        c.tokens = 0.0
        self.assertTrue(self.flood.throttle(c, 100.0))
        self.assertTrue(self.flood.throttle(c, 100.0 + FLOOD_GRACE))
        self.assertFalse(self.flood.throttle(c, 100.0 + FLOOD_GRACE + 0.01))

    def test_catching_up_restarts_the_grace(self):
        c = client()
        c.tokens = 0.0
        self.flood.throttle(c, 100.0)
        self.flood.caught_up(c)
        self.assertTrue(self.flood.throttle(c, 100.0 + FLOOD_GRACE + 1))
        self.assertTrue(self.flood.throttle(c, 100.0 + 2 * FLOOD_GRACE + 1))


if __name__ == "__main__":
    unittest.main()
