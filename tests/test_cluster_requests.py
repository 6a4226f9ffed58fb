"""chatlib.cluster.requests, sans-IO: clients waiting for Redis get one
answer each, in time, and none after they are gone."""

import unittest

import support  # noqa: F401  (the repository on the path)
from chatlib.cluster.requests import REQUEST_TIMEOUT, Requests


class RequestsTest(unittest.TestCase):
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
