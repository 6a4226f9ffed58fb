"""Black-box tests of ``--max-per-ip`` under churn.

The acceptor counts an address's connections from its workers' notes, which
say a connection closed a moment after the client closed it. A client at the
limit that closes a connection and at once opens another must not be refused
for the one it no longer has; a client truly over the limit still is.

The race is made certain where it matters by stopping the worker
(``SIGSTOP``): its note cannot come until it runs again. The one timing
assumption is that a test takes less than the acceptor's hold (one second)
between two of its own steps.
"""

import os
import re
import signal
import unittest

from support import TestCase, bound_client, read_until_eof, wait_stopped

HOLDING = r"acceptor\[\d+\] holding a connection from 127\.0\.0\.1"
REFUSED = r"acceptor\[\d+\] refused a connection from 127\.0\.0\.1"


class ChurnCase(TestCase):

    def ponged(self, c):
        """``c``, once it answered a PING (it was handed to a worker)."""
        c.send("PING")
        self.assertEqual(c.read_line(), "PONG")
        return c


class Churn(ChurnCase):

    def test_churn_at_the_limit_is_never_refused(self):
        """Hold the limit, close every connection and at once open as many:
        200 rounds, half closed by the client, half by QUIT."""
        limit = 8
        s = self.server("--max-per-ip", limit, workers=2)
        conns = [self.ponged(self.client(s)) for _ in range(limit)]
        for n in range(200):
            for c in conns:
                if n % 2:
                    c.send("QUIT")
                    c.expect_closed()
                c.close()
            conns = [self.client(s) for _ in range(limit)]
            for c in conns:
                c.send("PING")
            for c in conns:
                self.assertEqual(c.read_line(), "PONG", "round %d" % n)
        # And the count is right afterwards: the limit, not one more.
        self.assertEqual(self.client(s).expect_closed(), ["ERR too-many-connections"])

    def test_a_close_not_yet_noted_does_not_count(self):
        """The deterministic reproduction: the worker is stopped, so the
        acceptor cannot have heard of the close when the new client comes."""
        s = self.server("--max-per-ip", 2, "--log-level", "DEBUG", workers=1)
        first, second = self.ponged(self.client(s)), self.ponged(self.client(s))
        worker = s.roles()["chat-worker-0"]
        start = len(s.log_lines)
        os.kill(worker, signal.SIGSTOP)
        try:
            wait_stopped([worker])
            first.close()
            newcomer = self.client(s)
            newcomer.send("PING")
            m = s.wait_log("%s|%s" % (HOLDING, REFUSED), start=start)
            self.assertRegex(m.group(0), HOLDING, "refused although under the limit")
        finally:
            os.kill(worker, signal.SIGCONT)
        self.assertEqual(newcomer.read_line(), "PONG")
        self.ponged(second)
        # Two open again: the limit holds.
        self.assertEqual(self.client(s).expect_closed(), ["ERR too-many-connections"])

    def test_held_connection_goes_in_when_one_closes(self):
        s = self.server("--max-per-ip", 2, "--log-level", "DEBUG", workers=2)
        first, second = self.ponged(self.client(s)), self.ponged(self.client(s))
        start = len(s.log_lines)
        third = self.client(s)
        third.send("PING")
        s.wait_log(HOLDING, start=start)
        second.close()
        self.assertEqual(third.read_line(), "PONG")
        self.ponged(first)


class OverTheLimit(ChurnCase):

    def test_truly_over_the_limit_is_refused(self):
        s = self.server("--max-per-ip", 3, "--log-level", "DEBUG", workers=2)
        conns = [self.ponged(self.client(s)) for _ in range(3)]
        start = len(s.log_lines)
        extra = self.client(s)
        extra.send("LOGIN extra")
        s.wait_log(HOLDING, start=start)
        # While it waits, the others are served, and another address too.
        for c in conns:
            self.ponged(c)
        elsewhere = bound_client(s.port, "127.0.0.2")
        self.addCleanup(elsewhere.close)
        self.ponged(elsewhere)
        # No close comes: refused (the line it sent meanwhile read, so that
        # the close does not reset the connection).
        self.assertEqual(read_until_eof(extra, reset_ok=False).decode().splitlines(),
                         ["ERR too-many-connections"])
        s.wait_log(REFUSED, start=start)
        for c in conns:
            self.ponged(c)

    def test_no_more_held_than_the_limit(self):
        """At most --max-per-ip connections wait per address; past that, a
        connection is refused at once."""
        s = self.server("--max-per-ip", 2, "--log-level", "DEBUG", workers=1)
        for _ in range(2):
            self.ponged(self.client(s))
        start = len(s.log_lines)
        waiting = [self.client(s) for _ in range(2)]
        for _ in range(2):                  # both held...
            m = s.wait_log(HOLDING, start=start)
            start = s.log_lines_from(0).index(m.string, start) + 1
        # ...and a third is not: refused at once, not held.
        self.assertEqual(self.client(s).expect_closed(), ["ERR too-many-connections"])
        held = [line for line in s.log_lines_from(0) if re.search(HOLDING, line)]
        self.assertEqual(len(held), 2, s.log())
        for c in waiting:
            self.assertEqual(c.expect_closed(), ["ERR too-many-connections"])


if __name__ == "__main__":
    unittest.main()
