"""Short chaos runs: scripts/chaos.py kills server processes in turn under
chat load, and must find no broken promise."""

import os
import re
import subprocess
import sys
import unittest

from support import ROOT, TestCase

CHAOS = os.path.join(ROOT, "scripts", "chaos.py")


class Chaos(TestCase):
    timeout = 90

    def chaos_run(self, roles):
        """Kill ``roles`` in turn (a fixed seed, so each is hit) for 8 s of load;
        assert a clean result and the roles killed."""
        args = ["--duration", "8", "--interval", "1.5", "--workers", "3",
                "--clients", "20", "--seed", "5", "--kill-order", "cycle",
                "--roles", ",".join(roles)]
        run = subprocess.run([sys.executable, CHAOS] + args, cwd=ROOT,
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, timeout=80)
        out = run.stdout.decode("utf-8", "replace")
        self.assertEqual(run.returncode, 0, out)
        self.assertIn("RESULT: PASS", out)
        killed = set(re.findall(r"SIGKILL chat-(broker|acceptor|worker)", out))
        self.assertEqual(killed, set(roles), out)

    def test_worker_and_acceptor_kills(self):
        self.chaos_run(["worker", "acceptor"])

    def test_kills_of_every_role(self):
        self.chaos_run(["worker", "broker", "acceptor"])


if __name__ == "__main__":
    unittest.main()
