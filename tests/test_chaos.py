"""A short chaos run: scripts/chaos.py kills a worker, the broker and the
acceptor in turn under chat load, and finds no broken promise."""

import os
import re
import subprocess
import sys
import unittest

from support import ROOT, TestCase

CHAOS = os.path.join(ROOT, "scripts", "chaos.py")


class Chaos(TestCase):
    timeout = 90

    def test_short_chaos_run(self):
        # A fixed seed, and roles killed in turn: each is hit at least once.
        args = ["--duration", "8", "--interval", "1.5", "--workers", "3",
                "--clients", "20", "--seed", "5", "--kill-order", "cycle"]
        run = subprocess.run([sys.executable, CHAOS] + args, cwd=ROOT,
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, timeout=80)
        out = run.stdout.decode("utf-8", "replace")
        self.assertEqual(run.returncode, 0, out)
        self.assertIn("RESULT: PASS", out)
        killed = set(re.findall(r"SIGKILL chat-(broker|acceptor|worker)", out))
        self.assertEqual(killed, {"worker", "broker", "acceptor"}, out)


if __name__ == "__main__":
    unittest.main()
