"""A node's lease, as the node itself keeps time of it (sans-IO).

Redis times the lease (its key expires); the node only knows when it last
had it renewed, and plays safe: it takes the lease to run from when the
renewal was *sent*, and gives its users up (fences) a margin before that
could run out, so that it has closed them before any other node may reap
it. Only durations on this host's monotonic clock are compared: clocks need
not agree.

``value`` is what the lease key holds since the node's last JOIN: the
fencing token every script checks (:mod:`chatlib.cluster.registry`).
"""


class Lease:
    def __init__(self, seconds, now):
        self.seconds = seconds
        self.ms = int(seconds * 1000)
        self.renew_every = min(1.0, seconds / 4)
        self.margin = min(2.0, seconds / 4)
        self.value = None          # the lease key's value since our last JOIN
        # It surely holds until then. A restarted broker does not know when
        # its predecessor last renewed: it has a moment to join.
        self.until = now + 2 * self.margin
        self.next_renewal = 0.0
        self.renewal_sent = None   # when the renewal in flight was sent
        self.fenced = False        # given up: no names given until renewed

    @property
    def vouched_until(self):
        """Until when the node's users may be served: when it would fence."""
        return self.until - self.margin

    def renewed(self, sent, now):
        """Redis renewed it at ``sent`` or later; True if that ends a fence
        (a renewal sent before a long pause ends none)."""
        self.until = sent + self.seconds
        self.next_renewal = sent + self.renew_every
        if self.fenced and now < self.vouched_until:
            self.fenced = False
            return True
        return False

    def must_fence(self, now):
        return not self.fenced and now >= self.vouched_until

    def renewal_due(self, now):
        return self.renewal_sent is None and now >= self.next_renewal

    def last_renewed(self, now):
        """Seconds since the last renewal was sent."""
        return now - (self.until - self.seconds)
