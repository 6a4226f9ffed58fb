"""Flood control (``--rate``, ``--burst``): a token bucket per client.

A client may run ``burst`` lines at once, then ``rate`` a second on average.
Over that, its lines wait and its socket is not read ("fakelag", as IRC
servers do): a flooder is slowed, not answered, and TCP pushes back on it.
Only a client that stays over the rate for FLOOD_GRACE seconds is cut.

The bucket's state lives in the client's own slots (``tokens``,
``refilled``, ``throttled_since``; see ``chatlib.connection.Client``), so
that it costs no object per connection. This module never reads a clock:
the caller says what time it is.
"""

import heapq
import math

FLOOD_GRACE = 10.0         # seconds a client may stay over --rate before ERR flood


class FloodControl:
    """The buckets of one worker's clients, and when each throttled one may
    run again (a heap of ``(when, cid)``)."""

    def __init__(self, rate, burst):
        self.rate = rate
        self.burst = burst
        self.throttled = []

    def allowance(self, c, now):
        """Whole lines ``c`` may run now (the bucket refilled up to ``now``)."""
        tokens = min(self.burst, c.tokens + (now - c.refilled) * self.rate)
        c.tokens, c.refilled = tokens, now
        return int(tokens) if tokens > 0 else 0

    @staticmethod
    def spend(c, lines):
        """``c`` ran ``lines`` lines."""
        c.tokens -= lines

    @staticmethod
    def caught_up(c):
        """``c`` ran all that a read brought at once: no longer over the rate."""
        c.throttled_since = None

    def throttle(self, c, now):
        """``c`` has lines left over the rate: wait until a token is back.
        False instead when it has been over the rate for too long: cut it."""
        if c.throttled_since is None:
            c.throttled_since = now
        elif now - c.throttled_since > FLOOD_GRACE:
            return False
        heapq.heappush(self.throttled, (now + (1 - c.tokens) / self.rate, c.cid))
        return True

    def next_due(self):
        """When the first throttled client may run again (infinity: none waits)."""
        return self.throttled[0][0] if self.throttled else math.inf

    def due(self, now):
        """The cids whose wait is over by ``now``, taken off the heap one by
        one (a client throttled again meanwhile waits for a later time)."""
        throttled = self.throttled
        while throttled and throttled[0][0] <= now:
            yield heapq.heappop(throttled)[1]
