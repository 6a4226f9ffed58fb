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
import re

from support import Server, TestCase, kill_and_replace, per_start_method

from chatlib.supervisor import MAX_QUICK_DEATHS

SITECUSTOMIZE = "import multiprocessing.reduction\nmultiprocessing.reduction.ACKNOWLEDGE = True\n"
# Added to it: every worker process exits (status 3) as it starts, under
# any start method, before it reads an order or reports ready. No signal
# from outside can be timed that precisely.
WORKERS_DIE_AT_START = """
import multiprocessing.process, os
_bootstrap = multiprocessing.process.BaseProcess._bootstrap
def _die_if_worker(process, *args, **kwargs):
    if process.name.startswith("worker-"):
        os._exit(3)
    return _bootstrap(process, *args, **kwargs)
multiprocessing.process.BaseProcess._bootstrap = _die_if_worker
"""
RECOVERY_TIME = 3.0


class AcknowledgedHandoff(TestCase):
    start_method = None

    def env(self, fault=""):
        """Environment for a server whose processes all acknowledge
        descriptors (and run ``fault`` as they start)."""
        tmp = self.tmpdir("site")
        with open(os.path.join(tmp, "sitecustomize.py"), "w") as f:
            f.write(SITECUSTOMIZE + fault)
        return {"PYTHONPATH": os.pathsep.join(
            p for p in (tmp, os.environ.get("PYTHONPATH")) if p)}

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
            kill_and_replace(s, [role], RECOVERY_TIME)
            tag = role.rsplit("-", 1)[-1]
            self.check_chat(s, "x" + tag, "y" + tag)
        self.assertNotIn("Traceback", s.log())

    def test_child_dead_before_acknowledging(self):
        # Each new worker dies before it reads its orders: the supervisor's
        # wait for the acknowledgement ends in a reset, which must not stop
        # it from replacing the worker, then giving up.
        s = self.launched(Server(workers=1, start_method=self.start_method,
                                 env=self.env(WORKERS_DIE_AT_START)))
        self.assertEqual(s.proc.wait(30), 1)
        self.assertTrue(s.wait_log_end())
        log = s.log()
        self.assertIn("worker-0 keeps dying at start-up; giving up", log)
        self.assertEqual(len(re.findall(r"worker-0 \(pid \d+\) exited with status 3", log)),
                         MAX_QUICK_DEATHS, log)
        self.assertNotIn("Traceback", log)


per_start_method(globals(), AcknowledgedHandoff)
