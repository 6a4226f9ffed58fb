"""The sans-IO parts of a cluster node: its lease as it keeps time of it
(chatlib.cluster.lease), and its clients waiting for Redis
(chatlib.cluster.requests), one answer each, in time."""

from support import UnitTestCase

from chatlib.cluster.lease import Lease
from chatlib.cluster.requests import REQUEST_TIMEOUT, Requests


class RequestsTest(UnitTestCase):
    def test_a_request_past_its_time_expires_once(self):
        pending = Requests()
        first, second = pending.make(0, 1, now=10.0), pending.make(0, 2, now=11.0)
        self.assertEqual(pending.next_deadline(), 10.0 + REQUEST_TIMEOUT)
        self.assertEqual(pending.expired(10.0 + REQUEST_TIMEOUT - 0.1), [])
        self.assertEqual(pending.expired(10.0 + REQUEST_TIMEOUT), [first])
        self.assertTrue(first.done)
        self.assertEqual(pending.expired(10.0 + REQUEST_TIMEOUT), [])
        second.done = True                     # answered by Redis meanwhile
        self.assertEqual(pending.expired(100.0), [])
        self.assertIsNone(pending.next_deadline())

    def test_cancel_one_client_or_a_whole_worker(self):
        pending = Requests()
        a, b, c = (pending.make(slot, cid, 0.0) for slot, cid in ((0, 1), (0, 2), (1, 1)))
        pending.cancel(0, 2)
        self.assertEqual([r.done for r in (a, b, c)], [False, True, False])
        pending.cancel(0)
        self.assertEqual([r.done for r in (a, b, c)], [True, True, False])
        self.assertEqual(pending.expired(REQUEST_TIMEOUT), [c])


class LeaseTest(UnitTestCase):
    def test_users_are_served_until_a_margin_before_it_could_run_out(self):
        lease = Lease(10.0, now=0.0)
        self.assertEqual(lease.vouched_until, 2.0)       # a moment to join
        lease.renewed(sent=1.0, now=1.2)
        self.assertEqual((lease.vouched_until, lease.next_renewal), (9.0, 2.0))
        self.assertFalse(lease.must_fence(8.9))
        self.assertTrue(lease.must_fence(9.0))

    def test_a_renewal_sent_before_a_long_pause_ends_no_fence(self):
        lease = Lease(3.0, now=0.0)
        lease.fenced = True
        self.assertFalse(lease.renewed(sent=0.0, now=5.0))  # stopped meanwhile
        self.assertTrue(lease.fenced)
        self.assertTrue(lease.renewed(sent=5.0, now=5.1))
        self.assertFalse(lease.fenced)
        self.assertAlmostEqual(lease.last_renewed(6.0), 1.0)

    def test_one_renewal_in_flight_at_a_time(self):
        lease = Lease(3.0, now=0.0)
        self.assertTrue(lease.renewal_due(0.0))
        lease.renewal_sent = 0.0
        self.assertFalse(lease.renewal_due(5.0))
