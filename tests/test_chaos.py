"""Short chaos runs: scripts/chaos.py kills server processes in turn under
chat load (and, with --cluster, whole nodes and Redis), and must find no
broken promise."""

import os
import re
import subprocess
import sys
import unittest

from support import ROOT, TestCase, requires_redis

CHAOS = os.path.join(ROOT, "scripts", "chaos.py")


class ChaosRun(TestCase):
    timeout = 90

    def chaos_run(self, roles, *more):
        """Kill ``roles`` in turn (a fixed seed, so each is hit) for 8 s of load;
        assert a clean result and the roles killed."""
        args = ["--duration", "8", "--interval", "1.5", "--workers", "3",
                "--clients", "20", "--seed", "5", "--kill-order", "cycle",
                "--roles", ",".join(roles)] + list(more)
        run = subprocess.run([sys.executable, CHAOS] + args, cwd=ROOT,
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, timeout=80)
        out = run.stdout.decode("utf-8", "replace")
        self.assertEqual(run.returncode, 0, out)
        self.assertIn("RESULT: PASS", out)
        killed = set(re.findall(r"SIGKILL chat-(broker|acceptor|worker)|SIGKILL (node)\d"
                                r"|restarted (redis)", out))
        self.assertEqual({role for found in killed for role in found if role}, set(roles), out)
        return out


class Chaos(ChaosRun):
    def test_worker_and_acceptor_kills(self):
        self.chaos_run(["worker", "acceptor"])

    def test_kills_of_every_role(self):
        self.chaos_run(["worker", "broker", "acceptor"])


@requires_redis
class ClusterChaos(ChaosRun):
    def test_a_worker_a_node_and_redis_killed_on_two_nodes(self):
        # The lease is short, so that the dead node's users are announced,
        # and the names registered again after Redis, within the run; the
        # worker goes first, so that users of the other node's other worker
        # see it all from the start.
        out = self.chaos_run(["worker", "node", "redis"], "--cluster", "2", "--workers", "2",
                             "--duration", "9", "--interval", "1.2", "--node-lease", "2",
                             "--clients", "16")
        self.assertIn("a dead node's users within", out)
        self.assertRegex(out, r"check: [1-9]\d* departures x survivors")


if __name__ == "__main__":
    unittest.main()
