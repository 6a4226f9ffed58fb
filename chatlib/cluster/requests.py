"""A node's clients waiting for Redis: each gets one answer, in time.

A ``LOGIN``, ``WHO`` or ``DM`` that Redis must answer waits here, bounded by
REQUEST_TIMEOUT: past it the client gets ``ERR unavailable`` and its
connection stays open. Whichever comes first, Redis's reply or the timeout,
answers; the other finds the request done. Sans-IO: the caller says what
time it is.
"""

from collections import deque

REQUEST_TIMEOUT = 5.0     # a LOGIN or WHO waiting longer gets ERR unavailable


class Request:
    """A client's request waiting for Redis; ``done`` once answered (or the
    client is gone)."""

    __slots__ = ("slot", "cid", "deadline", "done")

    def __init__(self, slot, cid, deadline):
        self.slot = slot
        self.cid = cid
        self.deadline = deadline
        self.done = False


class Requests:
    def __init__(self):
        self.waiting = deque()     # in the order made, which is deadline order

    def make(self, slot, cid, now):
        request = Request(slot, cid, now + REQUEST_TIMEOUT)
        self.waiting.append(request)
        return request

    def cancel(self, slot, cid=None):
        """The client (``cid`` None: every client of worker ``slot``) is gone:
        its answers must not go to whoever takes its place."""
        for request in self.waiting:
            if request.slot == slot and (cid is None or request.cid == cid):
                request.done = True

    def next_deadline(self):
        return self.waiting[0].deadline if self.waiting else None

    def expired(self, now):
        """The requests whose time ran out unanswered, now done."""
        waiting, late = self.waiting, []
        while waiting and (waiting[0].done or waiting[0].deadline <= now):
            request = waiting.popleft()
            if not request.done:
                request.done = True
                late.append(request)
        return late
