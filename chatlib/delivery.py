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
    return tag == link.MSG or tag == link.BYE or (tag == link.DM and not event[4])


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

    def is_new(self, slot, number):
        """False for lines of a batch routed here before (a new broker
        resending it); ``slot`` None marks lines that come from no batch."""
        if slot is None:
            return True
        if number <= self.seen.get(slot, 0):
            return False
        self.seen[slot] = number
        return True
