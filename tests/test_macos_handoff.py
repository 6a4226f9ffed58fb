"""Descriptor passing the macOS way, emulated on Linux.

On macOS, ``multiprocessing.reduction`` acknowledges every descriptor it
passes with a byte sent back on the same pipe (its ``ACKNOWLEDGE`` flag), so
a pipe that carries descriptors must carry nothing else the other way. We
cannot run macOS here, but the flag is a module global read at every call: a
``sitecustomize`` that sets it, put on the server's ``PYTHONPATH``, makes
every process of the server pass descriptors the macOS way, under any start
method. (Before the supervisor's orders and the acceptor's notes got pipes of
their own, the server died at start-up like this.)
"""

import os
import signal
import tempfile

from support import Server, TestCase, per_start_method

SITECUSTOMIZE = "import multiprocessing.reduction\nmultiprocessing.reduction.ACKNOWLEDGE = True\n"
RECOVERY_TIME = 3.0


class AcknowledgedHandoff(TestCase):
    start_method = None

    def env(self):
        """Environment for a server whose processes all acknowledge descriptors."""
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        with open(os.path.join(tmp.name, "sitecustomize.py"), "w") as f:
            f.write(SITECUSTOMIZE)
        return {"PYTHONPATH": os.pathsep.join(
            p for p in (tmp.name, os.environ.get("PYTHONPATH")) if p)}

    def start(self):
        return self.server(workers=2, start_method=self.start_method, env=self.env())

    def check_chat(self, s, *names):
        """New users ``names`` see each other, and MSG and DM reach them. (Users
        of earlier rounds are around too, and their INFO lines may come.)"""
        users = [self.client(s, n) for n in names]
        for u in users:
            u.send("WHO", "PING")
            self.assertLessEqual({"USER " + n for n in names}, set(u.lines_until("PONG")))
        users[0].send("MSG hello", "DM %s psst" % names[1])
        for u in users[1:]:
            self.assert_only_info(u.lines_until("MSG %s hello" % names[0]))
        self.assert_only_info(users[1].lines_until("DM %s psst" % names[0]))

    def assert_only_info(self, lines):
        self.assertEqual([line for line in lines if not line.startswith("INFO ")], [])

    def test_serves_and_rewires_every_role(self):
        s = self.start()
        self.check_chat(s, "a", "b", "c")
        # Each restart sends new pipes to the survivors, acknowledged.
        for role in ("chat-worker-0", "chat-broker", "chat-acceptor"):
            old = s.roles()[role]
            os.kill(old, signal.SIGKILL)
            s.replacement(role, old, RECOVERY_TIME)
            tag = role.rsplit("-", 1)[-1]
            self.check_chat(s, "x" + tag, "y" + tag)
        self.assertNotIn("Traceback", s.log())

    def test_child_dead_before_acknowledging(self):
        # Each new worker dies before it reads its orders: the supervisor's
        # wait for the acknowledgement ends in a reset, which must not stop
        # it from replacing the worker, then giving up.
        s = Server(workers=1, start_method=self.start_method,
                   env=dict(self.env(), CHAT_CRASH_AT_START="worker"))
        self.addCleanup(s.kill)
        s.launch()
        self.assertEqual(s.proc.wait(30), 1)
        s.wait_log(r"worker-0 keeps dying at start-up; giving up")
        self.assertNotIn("Traceback", s.log())


per_start_method(globals(), AcknowledgedHandoff)
