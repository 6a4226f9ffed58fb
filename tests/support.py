"""Test harness: the real server as a subprocess, and line-oriented clients
(both from ``scripts/harness.py``, which the tools use too).

Every server runs in a fresh session (its own process group), so a test can
find and kill the whole process tree it started, including processes a
``forkserver`` started, and check that none is left over. Every blocking call
has a timeout, and :class:`TestCase` adds a per-test alarm on top.
"""

import os
import signal
import sys
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_TIMEOUT = 60           # seconds any single test may take
sys.path.insert(0, os.path.join(ROOT, "scripts"))
# The server, the client and /proc: shared with the tools, re-exported to the tests.
from procfs import process_role, session_pids  # noqa: E402,F401
from harness import (BROKER, IO_TIMEOUT, REDIS_HINT, Client, RedisServer,  # noqa: E402,F401
                     Server, redis_program, start_cluster)

START_METHODS = ["fork", "spawn", "forkserver"] if sys.platform != "win32" else ["spawn"]


def per_start_method(namespace, base):
    """Replace test class ``base`` in a module's ``namespace`` with one
    subclass per start method, named ``<base>_<method>``."""
    for method in START_METHODS:
        name = "%s_%s" % (base.__name__, method)
        # Of the test module, not of this one: its setUpModule and
        # tearDownModule must frame these classes too.
        namespace[name] = type(name, (base,), {"start_method": method,
                                               "__module__": base.__module__})
    del namespace[base.__name__]


def requires_redis(cls):
    """Cluster tests need a real ``redis-server``: without one they skip,
    saying how to get it; under ``CI=true`` they run, and fail."""
    if redis_program() is None and os.environ.get("CI") != "true":
        return unittest.skip(REDIS_HINT)(cls)
    return cls


class _Timeout(Exception):
    pass


class TestCase(unittest.TestCase):
    """Adds a per-test alarm, so that no test can hang the suite."""

    timeout = TEST_TIMEOUT

    def setUp(self):
        super().setUp()
        if hasattr(signal, "SIGALRM"):
            def on_alarm(signum, frame):
                raise _Timeout("test exceeded %d s" % self.timeout)
            old = signal.signal(signal.SIGALRM, on_alarm)
            signal.alarm(self.timeout)
            self.addCleanup(signal.signal, signal.SIGALRM, old)
            self.addCleanup(signal.alarm, 0)

    def server(self, *args, **kwargs):
        """Start a server that is killed, tree and all, when the test ends."""
        s = Server(*args, **kwargs)
        self.addCleanup(s.kill)
        s.start()
        return s

    def client(self, server, name=None):
        c = server.client(name)
        self.addCleanup(c.close)
        return c
