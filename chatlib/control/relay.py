"""Operator commands waiting for other processes' answers, in the supervisor.

The supervisor answers some commands itself (``stats``, ``reload``); the
rest need the broker, or every worker (``users``). It sends each an order
carrying a request number, and their answers come back on their reports
pipes, in any order, or never (a process dies, or hangs until the
heartbeat check kills it). A :class:`Relay` keeps each command until every
process asked has answered, has died, or its deadline has passed; then the
command's ``finish`` turns what came into the answer. Sans-IO: the caller
says what time it is.
"""

from collections import namedtuple

REPLY_TIMEOUT = 5.0     # seconds an operator command waits for the processes it asked

Waiting = namedtuple("Waiting", "reply finish asked parts deadline")
Waiting.__doc__ = """One command: ``reply(lines, error)`` answers the operator,
``finish(parts, complete)`` makes (lines, error) of the ``parts`` answered
by the processes ``asked`` (a set of child keys, emptied as they answer)."""


class Relay:
    def __init__(self):
        self.waiting = {}       # request number -> Waiting
        self.last = 0

    def ask(self, asked, reply, finish, now, timeout=REPLY_TIMEOUT):
        """A command sent to the processes ``asked``: its request number."""
        self.last += 1
        self.waiting[self.last] = Waiting(reply, finish, set(asked), {}, now + timeout)
        if not asked:
            self._done(self.last, True)
        return self.last

    def answered(self, request, child, part):
        """``child``'s answer to ``request`` (late ones are dropped)."""
        waiting = self.waiting.get(request)
        if waiting is not None and child in waiting.asked:
            waiting.asked.discard(child)
            waiting.parts[child] = part
            if not waiting.asked:
                self._done(request, True)

    def gone(self, child):
        """``child`` died: nobody waits for it any longer."""
        for request, waiting in list(self.waiting.items()):
            if child in waiting.asked:
                waiting.asked.discard(child)
                if not waiting.asked:
                    self._done(request, False)

    def expire(self, now):
        for request, waiting in list(self.waiting.items()):
            if now >= waiting.deadline:
                self._done(request, False)

    def next_deadline(self):
        return min((w.deadline for w in self.waiting.values()), default=None)

    def _done(self, request, complete):
        waiting = self.waiting.pop(request)
        lines, error = waiting.finish(waiting.parts, complete)
        waiting.reply(lines, error)
