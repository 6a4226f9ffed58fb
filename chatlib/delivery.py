"""Nothing lost and nothing twice when the broker dies: the workers' side.

A worker numbers every batch it sends to the broker and keeps the events
that carry users' lines (``MSG``, fire-and-forget ``DM``, ``BYE``) until the
broker acknowledges the batch, which it does only once their lines are in
the kernel's socket buffers. A new broker gets the unacknowledged ones again,
under their old numbers. The broker names the origin batch before the lines
it routes (``FROM``), and a receiving worker drops the lines of a batch it
has had before: batches from one worker are routed in order, so the highest
number seen from each worker is all it needs to remember.

Sans-IO bookkeeping, tested without sockets (``tests/test_delivery.py``).
"""

import time
from collections import deque

from chatlib import link


def resent(event):
    """Must a new broker get ``event`` again? Users' lines and departures
    must; a DM awaiting its answer goes again as a request instead."""
    tag = event[0]
    return tag == link.BROADCAST or tag == link.BYE or (tag == link.DM and not event[4])


class Outbound:
    """The batches a worker sent, numbered, until the broker acknowledges them."""

    def __init__(self):
        # The clock starts the numbers, so that they keep growing across
        # restarts of the worker and receivers never mistake new for old.
        self.last = time.time_ns()
        self.unacked = deque()      # (number, events to send again)

    def seal(self, events):
        """Number the batch ``events``; return the SEQ event that goes first."""
        self.last += 1
        kept = [e for e in events if resent(e)]
        if kept:
            self.unacked.append((self.last, kept))
        return (link.SEQ, self.last)

    def acknowledged(self, number):
        unacked = self.unacked
        while unacked and unacked[0][0] <= number:
            unacked.popleft()

    def replay(self):
        """For a new broker: every unacknowledged event, after its batch's SEQ."""
        events = []
        for number, kept in self.unacked:
            events.append((link.SEQ, number))
            events.extend(kept)
        return events


class Inbound:
    """The highest batch number routed to this worker from each other worker."""

    def __init__(self):
        self.seen = {}

    def merge(self, seen):
        """What another worker had seen (an upgrade moved its connections
        here): what a new broker sends again is dropped as it would have been."""
        for slot, number in seen.items():
            self.seen[slot] = max(self.seen.get(slot, 0), number)

    def is_new(self, slot, number):
        """False for lines of a batch routed here before (a new broker
        resending it); ``slot`` None marks lines that come from no batch."""
        if slot is None:
            return True
        if number <= self.seen.get(slot, 0):
            return False
        self.seen[slot] = number
        return True


class BrokerLink:
    """A worker's end of its link to the broker: the events it owes the
    broker and the numbering that makes a broker's death lose nothing.

    ``channel`` is None between brokers; what is queued meanwhile waits, up
    to ``limit`` events before the worker holds its clients' lines.
    """

    def __init__(self, limit):
        self.channel = None
        self.limit = limit
        self.outbox = []            # events for the broker this turn
        self.resend = []            # what a new broker gets before this turn's events
        self.sent = Outbound()      # our batches, until the broker acknowledges them
        self.routed = Inbound()     # which batches were routed to us already
        self.cursor = None          # cluster mode: the last stream entry routed to us

    def attach(self, channel, sync, requests):
        """A new broker: it gets ``sync``, the ``requests`` it must answer,
        then every unacknowledged event, before this turn's."""
        if self.channel is not None:
            self.channel.close()
        self.channel = channel
        self.resend = [sync] + requests + self.sent.replay()

    def lost(self):
        self.channel = None

    def unsent(self):
        """Events the broker has not acknowledged, or not been sent yet."""
        return self.sent.replay() + self.outbox

    def unrouted(self):
        """The events a retired broker did not route (it acknowledged all it
        did), for an upgrade's new worker to send again under new numbers;
        the requests among them go again from the clients that await them."""
        return [e for _, kept in self.sent.unacked for e in kept] + [
            e for e in self.outbox if resent(e)]

    def congested(self):
        """True while the broker cannot take more from us."""
        if self.channel is None:
            return len(self.outbox) > self.limit
        return self.channel.congested

    def flush(self):
        """Send the turn's events as one numbered batch; the number of
        events sent (0 without a broker: they wait for the next one)."""
        if not (self.outbox or self.resend) or self.channel is None:
            return 0
        events, self.outbox = self.outbox, []
        batch, self.resend = self.resend + [self.sent.seal(events)] + events, []
        self.channel.send(batch)    # may find the broker gone: attach resends
        return len(events)
