"""A restarted broker in one process, over socket pairs: what it tells each
worker once every worker has synced (the directory, and the departures a
worker that died with the old broker took along)."""

import selectors
import unittest
from multiprocessing import Pipe

from support import UnitTestCase

from broker import Broker
from chatlib import link
from chatlib.channel import Channel
from chatlib.config import parse_args
from chatlib.directory import LocalDirectory
from chatlib.delivery import Inbound

STAMP = 1000
PEER = ("127.0.0.1", 40000, False)


def sync(users=(), departed=(), listed=None, claims=()):
    """A worker's SYNC: ``users`` and ``departed`` as (cid, name)."""
    return (link.SYNC, [(cid, name, STAMP + cid) for cid, name in users],
            [(cid, name, STAMP + cid) for cid, name in departed], None,
            dict(listed or {}), list(claims))


class ClaimsInFlight(LocalDirectory):
    """Cluster mode as far as a restarted broker's recovery sees it: a
    LOGIN is a claim sent to Redis, answered later (by Broker.grant)."""

    def __init__(self, router):
        super().__init__(router)
        self.pending = []

    def claim(self, slot, cid, name, peer):
        self.pending.append((slot, cid, name))


class RestartedBroker(UnitTestCase):

    def setUp(self):
        super().setUp()
        self.sel = selectors.DefaultSelector()
        self.addCleanup(self.sel.close)
        self.broker = Broker(parse_args(["--port", "0"]), (None, None), expected=(0, 1, 2))
        self.broker.sel = self.sel
        self.broker.directory = LocalDirectory(self.broker)
        self.got = {}                           # slot -> batches the worker received
        self.workers = {}
        for slot in (0, 1, 2):
            ours, theirs = Pipe()
            self.broker.attach(slot, ours)
            self.got[slot] = []
            self.workers[slot] = Channel(theirs, self.sel, self.got[slot].extend, lambda: None)
            self.addCleanup(self.workers[slot].close)
        self.addCleanup(self.broker.finish)

    def send(self, slot, *events):
        """One batch from worker ``slot``, routed; the broker ends its turn."""
        self.broker.on_batches(slot, [list(events)])
        self.broker.end_turn()

    def events(self, slot):
        """Every event worker ``slot`` has received so far."""
        ready = self.sel.select(0.05)
        while ready:
            for key, mask in ready:
                key.data(mask)
            ready = self.sel.select(0.05)
        return [event for batch in self.got[slot] for event in batch]

    def lines(self, slot, routed=None):
        """The lines worker ``slot`` delivers, dropping those of a batch
        ``routed`` (a worker's Inbound) says it had before, as a worker does."""
        routed = routed or Inbound()
        self.events(slot)
        delivered = []
        for batch in self.got[slot]:
            seen_before = False
            for event in batch:
                if event[0] == link.FROM:
                    seen_before = not routed.is_new(event[1], event[2])
                elif event[0] == link.BROADCAST and not seen_before:
                    delivered.append(event[1])
        return b"".join(delivered).decode()

    def directory(self, slot):
        """The worker's directory after what it received."""
        names = {}
        for event in self.events(slot):
            if event[0] == link.JOINED:
                names[event[1]] = event[2]
            elif event[0] == link.LEFT:
                names.pop(event[1], None)
            elif event[0] == link.DIRECTORY:
                names = dict(event[1])
        return names

    def test_users_of_a_worker_that_died_with_the_old_broker_are_announced(self):
        self.send(0, sync(users=[(1, "Ada")], listed={"bob": "Bob", "cy": "Cy"}))
        self.send(1, sync())                    # the dead worker's replacement
        # Dee's line, which the old broker had routed to worker 0 already.
        self.send(2, sync(users=[(1, "Dee")], listed={"bob": "Bob"}),
                  (link.SEQ, 7), (link.BROADCAST, b"MSG Dee hi\n"))
        routed = Inbound()
        routed.is_new(2, 7)
        # The INFO lines come from no batch: none is taken for a resent one.
        self.assertEqual(self.lines(0, routed), "INFO Bob disconnected\nINFO Cy disconnected\n")
        self.assertEqual(self.lines(1), "MSG Dee hi\n")   # listed nobody: heard of nobody
        self.assertEqual(self.lines(2), "INFO Bob disconnected\n")
        self.assertEqual(self.directory(0), {"ada": "Ada", "dee": "Dee"})

    def test_nothing_after_a_broker_death_alone(self):
        self.send(0, sync(users=[(1, "Ada")], listed={"bob": "Bob", "cy": "Cy"}))
        self.send(1, sync(users=[(1, "Bob"), (2, "Cy")], listed={"ada": "Ada"}))
        self.send(2, sync())
        for slot in (0, 1, 2):
            self.assertEqual(self.lines(slot), "")

    def test_a_login_granted_during_the_recovery_stays_in_the_directory(self):
        self.send(1, sync(), (link.LOGIN, 5, "Bob", PEER, None))    # held until all synced
        self.send(0, sync())
        self.send(2, sync())
        self.assertIn((link.GRANTED, 5, "Bob", self.broker.users["bob"].stamp), self.events(1))
        for slot in (0, 2):
            self.assertEqual(self.directory(slot), {"bob": "Bob"})

    def test_a_name_claimed_again_is_not_announced(self):
        """The old broker granted Bob and told worker 0, then died before
        worker 1 heard: worker 1 claims Bob again, and in cluster mode the
        answer comes from Redis only after every worker has synced."""
        self.broker.directory = claims = ClaimsInFlight(self.broker)
        self.send(0, sync(listed={"bob": "Bob"}))
        self.send(2, sync())
        self.send(1, sync(claims=["bob"]), (link.LOGIN, 5, "Bob", PEER, None))
        self.assertEqual(claims.pending, [(1, 5, "Bob")])
        self.broker.grant(1, 5, "Bob", STAMP + 5)
        self.broker.send_lazy()                 # a new name goes after LAZY_DELAY
        self.assertEqual(self.lines(0), "")
        self.assertEqual(self.directory(0), {"bob": "Bob"})

    def test_a_departure_sent_again_is_announced_once(self):
        seq = (link.SEQ, 7)
        self.send(0, sync(listed={"bob": "Bob"}))
        self.send(2, sync())
        self.send(1, sync(departed=[(5, "Bob")]), seq, (link.BYE, 5, "Bob", STAMP + 5))
        self.assertEqual(self.lines(0), "INFO Bob disconnected\n")

    def test_a_departure_announced_during_the_recovery_is_not_announced_again(self):
        """Bob's worker dies before all have synced: the broker announces
        him, to worker 0 (synced) and to worker 2, whose SYNC, sent before
        it read that, still lists him."""
        self.send(0, sync(listed={"bob": "Bob"}))
        self.send(1, sync(users=[(5, "Bob")]))
        self.broker.detach(1)
        self.broker.end_turn()
        self.send(2, sync(listed={"bob": "Bob"}))
        for slot in (0, 2):
            self.assertEqual(self.lines(slot), "INFO Bob disconnected\n")


if __name__ == "__main__":
    unittest.main()
