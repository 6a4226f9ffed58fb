"""The stress tool (scripts/stress.py): every scenario at a small size, over
several servers and across the nodes of a cluster, over TLS, and proof that
its oracle fails against a server that loses, doubles, reorders or echoes
messages (over TLS too). Also scripts/compare.py against the reference
server, and scripts/cluster.py, which starts a cluster by hand."""

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import unittest

import support
from scripts import stress as stress_tool
from scripts.procfs import children

STRESS = os.path.join(support.ROOT, "scripts", "stress.py")
CLUSTER = os.path.join(support.ROOT, "scripts", "cluster.py")
COMPARE = os.path.join(support.ROOT, "scripts", "compare.py")


def stress(*args, timeout=40, env=None):
    """Run the tool with --json; (exit status, result dict). Past
    ``timeout`` its session is killed: its processes, the ctl it runs, and
    with it (they die with their parent) the servers it spawned."""
    proc = subprocess.Popen([sys.executable, STRESS] + [str(a) for a in args]
                            + ["--json", "--procs", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, env=env)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    try:
        return proc.returncode, json.loads(stdout)
    except ValueError:
        raise AssertionError("no JSON from stress.py: %r\n%s"
                             % (stdout, stderr.decode(errors="replace")))


class FaultyServer(threading.Thread):
    """A one-thread asyncio chat server with a deliberate fault.

    ``drop``: every 10th MSG delivery is skipped; ``echo``: a MSG also goes
    back to its sender; ``duplicate``: every 10th delivery is made twice;
    ``reorder``: every 10th delivery comes after the next one to the same
    user. Just enough protocol for the fanout scenario; with ``tls`` (a
    server ``SSLContext``), over TLS.
    """

    def __init__(self, fault, tls=None):
        super().__init__(daemon=True)
        self.fault = fault
        self.tls = tls
        self.users = {}
        self.held = {}
        self.deliveries = 0
        self.ready = threading.Event()
        self.loop = asyncio.new_event_loop()

    def __enter__(self):
        self.start()
        self.ready.wait(5)
        return self

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.join(5)

    def run(self):
        self.loop.set_exception_handler(lambda loop, context: None)   # clients vanish
        server = self.loop.run_until_complete(
            asyncio.start_server(self.serve, "127.0.0.1", 0, ssl=self.tls))
        self.port = server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()
        server.close()
        for writer in self.users.values():
            writer.close()
        self.loop.close()

    def deliver(self, sender, line):
        for name, writer in self.users.items():
            if name == sender and self.fault != "echo":
                continue
            self.deliveries += 1
            nth = self.deliveries % 10 == 0
            if self.fault == "drop" and nth:
                continue
            if self.fault == "duplicate" and nth:
                writer.write(line)
            held = self.held.pop(name, b"") if self.fault == "reorder" else b""
            if self.fault == "reorder" and nth and not held:
                self.held[name] = line
                continue
            writer.write(line + held)

    async def serve(self, reader, writer):
        try:
            await self.session(reader, writer)
        except ConnectionError:
            pass
        writer.close()

    async def session(self, reader, writer):
        name = None
        while True:
            line = await reader.readline()
            cmd, _, rest = line.decode().strip().partition(" ")
            if not line or cmd == "QUIT":
                break
            if cmd == "LOGIN":
                name = rest
                self.users[name] = writer
                writer.write(b"OK\n")
            elif cmd == "MSG":
                self.deliver(name, ("MSG %s %s\n" % (name, rest)).encode())
            elif cmd == "PING":
                writer.write(b"PONG\n")
        self.users.pop(name, None)
        if name is not None:
            self.deliver(name, ("INFO %s disconnected\n" % name).encode())


class StressScenarios(support.TestCase):
    """Each scenario passes its own oracle against the real server."""

    timeout = 60

    def assertPassed(self, status, result):
        self.assertEqual((status, result["failures"]), (0, {}), result)
        self.assertTrue(result["ok"])
        self.assertGreater(result["tool_cpu_s"], 0)
        self.assertIn(result["tool_bound"], (True, False))

    def test_fanout(self):
        status, r = stress("fanout", "--spawn-server", "--workers", 2, "--clients", 40,
                           "--senders", 3, "--duration", 1)
        self.assertPassed(status, r)
        self.assertEqual(r["logged_in"], 40)
        self.assertGreater(r["msgs_sent"], 0)
        self.assertGreater(r["deliveries_per_s"], r["msgs_per_s"])
        self.assertTrue(r["drain_complete"])
        self.assertGreater(r["latency_samples"], 0)
        self.assertLessEqual(r["latency_p50_ms"], r["latency_p99_ms"])
        self.assertEqual(r["server_exit"], 0)
        self.assertIn("server_cpu_s", r)

    def test_fanout_at_a_fixed_rate_counting(self):
        """--check sample: most receivers count bytes, and come out even."""
        status, r = stress("fanout", "--spawn-server", "--clients", 60, "--senders", 2,
                           "--duration", 1, "--rate", 200, "--size", 100, "--check", "sample")
        self.assertPassed(status, r)
        self.assertLess(abs(r["msgs_per_s"] - 200), 60, r)
        self.assertGreater(r["deliveries_per_s"], 50 * r["msgs_per_s"], r)
        self.assertGreater(r["latency_samples"], 0)

    def test_dm_against_a_running_server(self):
        s = self.server("--rate", "0")
        status, r = stress("dm", "--port", s.port, "--server-pid", s.proc.pid,
                           "--pairs", 6, "--duration", 1)
        self.assertPassed(status, r)
        self.assertGreater(r["round_trips"], 0)
        self.assertGreater(r["rtt_samples"], 0)
        self.assertIsNotNone(r["rtt_p999_ms"])
        self.assertGreater(r["server_cpu_s"], 0)
        self.assertIn("server_cpu_us_per_round_trip", r)
        status, r = stress("ping", "--port", s.port, "--server-pid", s.proc.pid,
                           "--clients", 6, "--duration", 1)
        self.assertPassed(status, r)
        self.assertGreater(r["pongs_per_s"], 100)
        self.assertLessEqual(r["rtt_p50_ms"], r["rtt_p99_ms"])

    def test_connect(self):
        status, r = stress("connect", "--spawn-server", "--clients", 300, "--hold", 0.2,
                           "--settle", 0.2)
        self.assertPassed(status, r)
        self.assertEqual((r["logged_in"], r["alive_after_hold"]), (300, 300))
        self.assertGreater(r["logins_per_s"], 0)
        self.assertIn("server_kb_per_client", r)
        self.assertGreater(r["server_cpu_us_per_login"], 0)

    def test_connect_with_a_password(self):
        """--password: the spawned server has every name registered first
        (a wrong or missing password would be ERR bad-password, an
        unregistered name ERR invalid-username); each login is a check."""
        status, r = stress("connect", "--spawn-server", "--clients", 6,
                           "--password", "correct horse", "--hold", 0, "--settle", 0)
        self.assertPassed(status, r)
        self.assertEqual((r["registered"], r["logged_in"]), (6, 6))
        self.assertGreater(r["logins_per_s"], 0)
        self.assertGreater(r["server_cpu_us_per_login"], 5000)     # scrypt: ~40 ms

    def test_dm_under_attack(self):
        """--attack: the victims registered, every guess refused (the first
        few after a check, the rest before one), the pairs' figures as ever."""
        status, r = stress("dm", "--spawn-server", "--workers", 2, "--pairs", 6,
                           "--duration", 2, "--attack", 20)   # refusals come 1 s late
        self.assertPassed(status, r)
        self.assertEqual((r["registered"], r["attackers"]), (5, 20))
        self.assertGreater(r["round_trips"], 0)
        self.assertLessEqual(r["rtt_p50_ms"], r["rtt_p99_ms"])
        self.assertEqual(r["guesses"],
                         r["guesses_bad_password"] + r["guesses_too_many_attempts"])
        self.assertGreater(r["guesses_bad_password"], 0)
        self.assertGreater(r["guesses_too_many_attempts"], 0)
        self.assertGreater(r["guesses_per_s"], 0)
        self.assertGreater(r["server_peak_rss_mb"], 0)

    def test_churn(self):
        status, r = stress("churn", "--spawn-server", "--clients", 12, "--observers", 4,
                           "--duration", 1)
        self.assertPassed(status, r)
        self.assertGreater(r["lives"], 12)
        self.assertTrue(r["drain_complete"])
        self.assertGreater(r["server_cpu_us_per_life"], 0)

    def test_refused(self):
        """A banned address: each connection gets ERR banned, then EOF."""
        status, r = stress("refused", "--spawn-server", "--workers", 2,
                           "--ctl", "ban 127.0.0.0/8", "--clients", 20, "--duration", 1)
        self.assertPassed(status, r)
        self.assertEqual(r["ctl"], ["ban 127.0.0.0/8"])
        self.assertGreater(r["refusals"], 20)
        self.assertEqual(r["refusal_samples"], r["refusals"])
        self.assertLessEqual(r["refusal_p50_ms"], r["refusal_p99_ms"])
        self.assertGreater(r["server_cpu_us_per_refusal"], 0)

    def test_ctl_commands_go_to_the_spawned_server(self):
        """--ctl: a refused command makes the run fail, saying the answer;
        the control socket and the state directory go with the server."""
        own_tmp = tempfile.mkdtemp(prefix="chat-stress-test-")
        self.addCleanup(shutil.rmtree, own_tmp, True)
        status, r = stress("connect", "--spawn-server", "--clients", 2, "--hold", 0,
                           "--settle", 0, "--ctl", "ban 192.0.2.0/24", "--ctl", "frobnicate",
                           env=dict(os.environ, TMPDIR=own_tmp))
        self.assertEqual(status, 1)
        self.assertIn("'frobnicate': ERR unknown-command", r["examples"]["fatal"][0], r)
        self.assertEqual(r["server_exit"], 0)
        self.assertEqual(os.listdir(own_tmp), [])

    def test_upgrade(self):
        """Two live upgrades under load, a quarter of the clients over TLS,
        newcomers arriving: nobody notices, the lines cut in two by an
        upgrade come whole, and no old process is left but TLS relays."""
        status, r = stress("upgrade", "--spawn-server", "--workers", 2, "--clients", 40,
                           "--senders", 4, "--rate", 100, "--upgrades", 2, "--every", 1,
                           timeout=50)
        self.assertPassed(status, r)
        self.assertEqual((r["logged_in"], r["tls_clients"]), (40, 10))
        self.assertEqual(r["upgrades_done"], 2)
        self.assertEqual(len(r["upgrade_said_s"]), 2)
        self.assertGreaterEqual(min(r["upgrade_moved"]), 40)
        self.assertGreater(r["partial_lines"], 0)
        self.assertEqual(r["partial_lines_finished"], r["partial_lines"])
        self.assertGreater(r["newcomers"], 0)
        self.assertGreater(r["latency_during_upgrade_samples"], 0)
        self.assertEqual(r["old_processes_left"], [])
        self.assertGreater(r["old_processes_relaying"], 0)
        self.assertEqual(r["server_exit"], 0)

    def test_slow_consumers_are_cut(self):
        status, r = stress("slow", "--spawn-server", "--clients", 12, "--slow", 2,
                           "--max-pending", 65536)
        self.assertPassed(status, r)
        self.assertLess(r["duration_s"], 15)
        self.assertIn("server_peak_rss_mb", r)


class SeveralServers(support.TestCase):
    """Clients spread over several servers: client i to the (i mod n)-th."""

    timeout = 60

    def test_connect_spread_over_two_servers(self):
        a, b = self.server("--rate", "0", workers=1), self.server("--rate", "0", workers=1)
        pids = "%d,%d" % (a.proc.pid, b.proc.pid)
        spreads = (["--port", "%d,%d" % (a.port, b.port)],
                   ["--target", "127.0.0.1:%d" % a.port, "--target", "localhost:%d" % b.port])
        for k, spread in enumerate(spreads):
            with self.subTest(spread=spread[0]):
                status, r = stress("connect", *spread, "--server-pid", pids, "--clients", 40,
                                   "--hold", 0.2, "--settle", 0.1, "--prefix", "c%d" % k)
                self.assertPassed(status, r)
                self.assertEqual(r["port"], [a.port, b.port])
                self.assertEqual(r["server_pid"], [a.proc.pid, b.proc.pid])
                for s in (a, b):
                    logins = re.findall(r" c%dc\d+ logged in from " % k, s.log())
                    self.assertEqual(len(logins), 20, s.log())
                self.assertIn("server_kb_per_client", r)

    assertPassed = StressScenarios.assertPassed


@support.requires_redis
class Cluster(support.TestCase):
    """--spawn-cluster: a Redis and two nodes; the oracle holds across them."""

    timeout = 60

    def assertCluster(self, status, r):
        StressScenarios.assertPassed(self, status, r)
        self.assertEqual(len(r["port"]), 2)
        self.assertEqual(r["server_exit"], [0, 0])
        self.assertGreater(r["redis_calls"], 0)
        self.assertGreaterEqual(r["redis_cpu_s"], 0)
        self.assertGreater(r["redis_calls_per_msg"], 0)

    def test_fanout_across_two_nodes(self):
        status, r = stress("fanout", "--spawn-cluster", 2, "--workers", 1, "--clients", 30,
                           "--senders", 4, "--duration", 1)
        self.assertCluster(status, r)
        self.assertEqual(r["logged_in"], 30)
        self.assertTrue(r["drain_complete"])

    def test_dm_every_pair_across_nodes(self):
        status, r = stress("dm", "--spawn-cluster", 2, "--workers", 1, "--pairs", 4,
                           "--duration", 1)
        self.assertCluster(status, r)
        self.assertGreater(r["round_trips"], 0)


class OverTls(support.TestCase):
    """--tls: every client on TLS, the same oracle; --spawn-* start the
    servers --tls-only with a certificate the tool makes and removes."""

    timeout = 60

    def assertTls(self, status, r, server_exit=0):
        StressScenarios.assertPassed(self, status, r)
        self.assertIs(r["tls"], True)
        self.assertEqual(r.get("server_exit"), server_exit)

    def test_fanout(self):
        own_tmp = tempfile.mkdtemp(prefix="chat-stress-test-")
        self.addCleanup(shutil.rmtree, own_tmp, True)
        status, r = stress("fanout", "--tls", "--spawn-server", "--clients", 30,
                           "--senders", 3, "--duration", 1, env=dict(os.environ, TMPDIR=own_tmp))
        self.assertTls(status, r)
        self.assertEqual(r["logged_in"], 30)
        self.assertGreater(r["deliveries_per_s"], r["msgs_per_s"])
        self.assertTrue(r["drain_complete"])
        self.assertGreater(r["latency_samples"], 0)
        self.assertEqual(os.listdir(own_tmp), [], "the certificate's directory is removed")

    def test_dm(self):
        status, r = stress("dm", "--tls", "--spawn-server", "--pairs", 6, "--duration", 1)
        self.assertTls(status, r)
        self.assertGreater(r["round_trips"], 0)

    def test_handshakes(self):
        status, r = stress("handshake", "--spawn-server", "--clients", 4, "--duration", 1)
        self.assertTls(status, r)
        self.assertGreater(r["handshakes"], 10)
        self.assertGreater(r["server_cpu_ms_per_handshake"], 0)

    def test_churn_half_closes_with_close_notify(self):
        status, r = stress("churn", "--tls", "--spawn-server", "--clients", 9,
                           "--observers", 3, "--duration", 1)
        self.assertTls(status, r)
        self.assertGreater(r["lives"], 9)
        self.assertTrue(r["drain_complete"])

    def test_a_running_server_on_its_tls_port(self):
        """--port names the TLS port; the plaintext port is no TLS one."""
        directory = tempfile.mkdtemp(prefix="chat-stress-test-")
        self.addCleanup(shutil.rmtree, directory, True)
        s = self.server("--rate", "0", tls=support.self_signed(directory), workers=1)
        self.assertNotEqual(s.tls_port, s.port)
        status, r = stress("connect", "--tls", "--port", s.tls_port, "--server-pid", s.proc.pid,
                           "--clients", 20, "--hold", 0.2, "--settle", 0.1)
        self.assertTls(status, r, server_exit=None)
        self.assertEqual(r["alive_after_hold"], 20)
        status, r = stress("connect", "--tls", "--port", s.port, "--clients", 2,
                           "--hold", 0, "--setup-timeout", 5)
        self.assertEqual(status, 1)
        self.assertGreater(r["failures"].get("tls-failed", 0), 0, r)

    def test_without_openssl_a_clear_error(self):
        proc = subprocess.run([sys.executable, STRESS, "dm", "--tls", "--spawn-server"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=20,
                              env=dict(os.environ, PATH=os.path.join(support.ROOT, "nowhere")))
        self.assertEqual(proc.returncode, 2)
        self.assertIn(b"openssl not found", proc.stderr)

    @support.requires_redis
    def test_fanout_across_two_nodes(self):
        status, r = stress("fanout", "--tls", "--spawn-cluster", 2, "--workers", 1,
                           "--clients", 20, "--senders", 3, "--duration", 1)
        self.assertTls(status, r, server_exit=[0, 0])
        self.assertEqual(r["logged_in"], 20)
        self.assertGreater(r["redis_calls"], 0)


class CompareScript(support.TestCase):
    """compare.py: the reference server and ours, each once, one stress
    scenario; the reference passes the oracle too."""

    timeout = 60

    def test_reference_then_ours(self):
        proc = subprocess.run([sys.executable, COMPARE, "fanout", "--runs", "1", "--json",
                               "--clients", "12", "--senders", "2", "--duration", "0.5",
                               "--procs", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=50,
                              start_new_session=True)
        self.assertEqual(proc.returncode, 0, proc.stderr.decode(errors="replace"))
        out = json.loads(proc.stdout)
        self.assertEqual((out["a"], out["b"]), ("reference", "ours"))
        for side in "ab":
            (run,) = out["runs"][side]
            self.assertTrue(run["ok"], run)
            self.assertEqual(run["logged_in"], 12)
            self.assertGreater(out["medians"][side]["deliveries_per_s"], 0)
        self.assertEqual(out["runs"]["b"][0]["server_exit"], 0)


@support.requires_redis
class ClusterScript(support.TestCase):
    """scripts/cluster.py up: a chat over its nodes; Ctrl-C leaves no process."""

    timeout = 60

    def test_up_chat_and_ctrl_c(self):
        proc = subprocess.Popen([sys.executable, CLUSTER, "up", "2", "--quiet"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.addCleanup(proc.stdout.close)
        self.addCleanup(proc.stdin.close)
        self.addCleanup(lambda: proc.poll() is None and os.killpg(proc.pid, 9))
        ports, out = [], []
        while not out or not out[-1].startswith("try: "):
            out.append(proc.stdout.readline().decode())
            self.assertTrue(out[-1], "".join(out))
            m = re.match(r"node\d+  127.0.0.1:(\d+)  up", out[-1])
            if m:
                ports.append(int(m.group(1)))
        self.assertEqual(len(ports), 2, out)
        pids = [pid for child in children(proc.pid) for pid in support.session_pids(child)]
        self.assertGreaterEqual(len(pids), 8, "2 nodes of 4 processes, and redis")
        with support.Client(ports[0]) as a, support.Client(ports[1]) as b:
            a.login("ada")
            b.login("bob")
            a.send("MSG across")
            b.expect("MSG ada across")
        proc.send_signal(signal.SIGINT)
        self.assertEqual(proc.wait(20), 0)
        self.assertEqual([pid for pid in pids if support.process_role(pid)], [])


class OracleCanFail(support.TestCase):
    """Against a faulty server the tool must exit 1 and name the fault."""

    timeout = 30

    def run_against(self, fault, tls=None, *more):
        with FaultyServer(fault, tls) as server:
            return stress("fanout", "--port", server.port, "--clients", 6, "--senders", 2,
                          "--duration", 0.5, "--rate", 400, "--drain-timeout", 1,
                          *(["--tls"] if tls else []), *more)

    def test_lost_messages_are_reported(self):
        status, r = self.run_against("drop")
        self.assertEqual(status, 1)
        self.assertFalse(r["ok"])
        self.assertGreater(r["failures"].get("lost", 0), 0, r["failures"])

    def test_counting_receivers_see_losses(self):
        """--check sample: a counting receiver is owed a number of bytes."""
        status, r = self.run_against("drop", None, "--clients", 60, "--check", "sample")
        self.assertEqual(status, 1)
        # A tenth of every receiver's lines are lost: more than the two that
        # check (one in fifty) could count, so the counting ones did too.
        self.assertGreater(r["failures"].get("lost", 0), r["msgs_sent"], r["failures"])

    def test_lost_messages_are_reported_over_tls(self):
        directory = tempfile.mkdtemp(prefix="chat-stress-test-")
        self.addCleanup(shutil.rmtree, directory, True)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*support.self_signed(directory))
        status, r = self.run_against("drop", context)
        self.assertEqual(status, 1)
        self.assertIs(r["tls"], True)
        self.assertGreater(r["failures"].get("lost", 0), 0, r["failures"])
        self.assertNotIn("tls-failed", r["failures"])

    def test_echo_to_sender_is_reported(self):
        status, r = self.run_against("echo")
        self.assertEqual(status, 1)
        self.assertGreater(r["failures"].get("echo-to-sender", 0), 0, r["failures"])

    def test_a_guess_let_in_is_a_failure(self):
        """--attack: an OK to a guess is a failure (this server takes any LOGIN)."""
        with FaultyServer("none") as server:
            status, r = stress("ping", "--port", server.port, "--clients", 2,
                               "--duration", 0.3, "--attack", 4)
        self.assertEqual(status, 1)
        self.assertEqual(r["failures"].get("guess-accepted"), 4, r["failures"])
        self.assertIn("victim0 wrongpassword", r["examples"]["guess-accepted"][0])

    def test_refused_logins_are_failures(self):
        status, r = stress("connect", "--spawn-server", "--ctl", "ban 127.0.0.0/8",
                           "--clients", 4, "--hold", 0, "--settle", 0)
        self.assertEqual(status, 1)
        self.assertEqual(r["failures"], {"login-failed": 4})
        self.assertEqual((r["logged_in"], r["alive_after_hold"]), (0, 0))

    def test_refused_needs_the_line_and_the_close(self):
        """refused: another line fails; so does a server that accepts and
        waits (no ban), once --timeout has passed."""
        status, r = stress("refused", "--spawn-server", "--ctl", "ban 127.0.0.0/8",
                           "--expect-line", "ERR nope", "--clients", 4, "--duration", 0.3)
        self.assertEqual(status, 1)
        self.assertGreater(r["failures"].get("unexpected-line", 0), 0, r["failures"])
        self.assertIn("b'ERR banned\\n'", r["examples"]["unexpected-line"][0])
        self.assertEqual(r["refusals"], 0)
        status, r = stress("refused", "--spawn-server", "--clients", 4, "--duration", 0.3,
                           "--timeout", 0.2)
        self.assertEqual(status, 1)
        self.assertEqual(set(r["failures"]), {"not-refused"}, r["failures"])
        self.assertEqual(r["refusals"], 0)

    def test_a_refused_upgrade_is_a_failure(self):
        """ctl upgrade's ERR fails the run, saying it; the processes that
        stay because of it are no old processes left."""
        status, r = stress("upgrade", "--spawn-server", "--clients", 10, "--senders", 2,
                           "--upgrades", 1, "--every", 0.5, "--upgrade-args=--bogus")
        self.assertEqual((status, r["failures"]), (1, {"upgrade-failed": 1}), r)
        self.assertIn("ERR refused", r["examples"]["upgrade-failed"][0])
        self.assertEqual((r["upgrades_done"], r["old_processes_left"]), (0, []))

    def test_duplicates_and_reordering_are_reported(self):
        for fault in ("duplicate", "reorder"):
            with self.subTest(fault=fault):
                status, r = self.run_against(fault)
                self.assertEqual(status, 1)
                self.assertGreater(r["failures"].get("duplicate-or-reordered", 0), 0,
                                   r["failures"])


class ToolBound(unittest.TestCase):
    """The tool says when its own CPU, not the server, was the limit."""

    def bound(self, cpu, wait=(0, 0), span=10.0):
        setups = [{"cpu": 1.0, "wait": 0.0}, {"cpu": 1.0, "wait": 0.0}]
        runs = [{"cpu": 1.0 + c, "wait": w} for c, w in zip(cpu, wait)]
        return stress_tool.tool_figures(setups, runs, span)

    def test_the_limit(self):
        self.assertFalse(self.bound([3, 3])["tool_bound"])
        self.assertTrue(self.bound([9, 9])["tool_bound"])
        self.assertTrue(self.bound([9, 1])["tool_bound"], "one process on a whole core")
        r = self.bound([5, 5], wait=[4, 4])
        self.assertTrue(r["tool_bound"], "waiting for a CPU is wanting it")
        self.assertEqual((r["tool_cpu_pct"], r["tool_cpu_wait_pct"]), (100.0, 80.0))

    def test_said_beside_the_figures(self):
        result = {"scenario": "fanout", "failures": {}, "examples": {}}
        result.update(self.bound([9, 9]))
        self.assertIn("NOTE: the tool was the limit", stress_tool.summary(result))


class BulkCheck(unittest.TestCase):
    """A read of many MSG lines is judged in bulk; the verdict must be the
    line-by-line check's: anything wrong falls back to it, changing nothing."""

    def setUp(self):
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        cfg = dict(targets=[("127.0.0.1", 1)], spread=False, prefix=b"t", senders=3,
                   clients=11, procs=1, size=40, sample=5, window=0, rate=0,
                   slow_set=frozenset(), check="all")
        self.load = stress_tool.Broadcast(cfg, 0, a, [0] * stress_tool.BOARD_SLOTS,
                                          [0] * 3, [0] * 11)
        self.reader = self.load.clients[10]         # records latency
        self.names = self.load.sender_names

    def line(self, sender, seq):
        text = self.load.msg.batch(seq, 1, 10 ** 18)[4:-1]     # stamped if sampled
        return b"MSG " + self.names[sender] + b" " + text

    def stream(self, count=60):
        """``count`` lines, the three senders interleaved in runs, in order."""
        seqs, lines = [0, 0, 0], []
        for k in range(count):
            s = (k // 7 + k % 2) % 3
            lines.append(self.line(s, seqs[s]))
            seqs[s] += 1
        return lines, seqs

    def test_good_lines_pass_in_bulk(self):
        lines, seqs = self.stream()
        self.assertTrue(self.load.bulk_check(self.reader, lines))
        self.assertEqual([self.reader.nxt[n] for n in self.names], seqs)
        self.assertEqual(len(self.load.lat), sum((q + 4) // 5 for q in seqs))
        self.assertEqual(set(self.load.lat_sent), {10 ** 18}, "each sample's send time")
        more = [self.line(0, seqs[0] + k) for k in range(20)]
        self.load.on_lines(self.reader, more)
        self.assertEqual(self.reader.nxt[self.names[0]], seqs[0] + 20)
        self.assertEqual(self.load.failures, {})

    def check_fault(self, lines, kind):
        before = dict(self.reader.nxt)
        self.assertFalse(self.load.bulk_check(self.reader, lines))
        self.assertEqual(self.reader.nxt, before)
        self.load.on_lines(self.reader, lines)
        self.assertGreater(self.load.failures[kind], 0, self.load.failures)

    def test_a_duplicate(self):
        lines, _ = self.stream()
        self.check_fault(lines[:30] + lines[29:], "duplicate-or-reordered")

    def test_two_lines_of_one_sender_swapped(self):
        lines, _ = self.stream()
        lines[0], lines[2] = lines[2], lines[0]         # both from sender 0
        self.check_fault(lines, "duplicate-or-reordered")

    def test_a_lost_line(self):
        lines, _ = self.stream()
        self.check_fault(lines[:20] + lines[21:], "lost")

    def test_a_cut_or_corrupt_line(self):
        for bad in (lambda l: l[:-1], lambda l: l.replace(b"00000", b"0000x", 1)):
            with self.subTest():
                lines, _ = self.stream()
                lines[25] = bad(lines[25])
                self.check_fault(lines, "unexpected-line")

    def test_a_line_that_is_not_a_msg(self):
        lines, _ = self.stream()
        self.check_fault(lines[:10] + [b"INFO tx disconnected"] + lines[10:],
                         "unexpected-line")


if __name__ == "__main__":
    unittest.main()
