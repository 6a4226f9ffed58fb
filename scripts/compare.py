#!/usr/bin/env python3
"""Two servers side by side: the same stress.py scenario, alternated runs, medians.

The machines we measure on are shared and noisy, so one absolute figure
means little. This starts a fresh server for every run, runs the scenario
against A and B in turn, A B in one round and B A in the next (so neither
always goes first, on a machine that warms up or gets busier), and prints
the median of every figure of each and the ratio B / A.

    compare.py fanout --clients 1000 --senders 10 --duration 5 --check sample
    compare.py dm --pairs 50 --duration 5 --runs 5
    compare.py fanout --clients 1000 --senders 10 --a "ours --workers 2" --b "cluster:2"
    compare.py dm --pairs 50 --a "ours:$OLD" --b ours     (OLD: a git worktree of an older commit)
    compare.py fanout --clients 1000 --senders 10 --a ours --b "ours --tls"

A and B (``--a``, default ``reference``; ``--b``, default ``ours``) are
each a server, then options of stress.py for that side alone:

    ours[:PATH]         broker.py of this tree (or of the checkout at PATH),
                        --workers 4 unless the side says otherwise
    cluster:N[:PATH]    N nodes of one worker each on a fresh Redis
    reference           scripts/reference_server.py (one process, asyncio)
    'COMMAND ... {port}'  any other server of the protocol, on a free port

Every other option goes to stress.py unchanged. ``ours`` and ``cluster``
are started by stress.py itself (``--spawn-server``, ``--spawn-cluster``,
with its load-test limits: no flood control, no per-address cap); the
others by this script, once their port takes a connection. Exit status 1
if any run failed its checks.
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys

if not __package__:     # run as a file, python3 scripts/compare.py: see __init__.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = os.path.basename(os.path.dirname(os.path.abspath(__file__)))

from .harness import ROOT, Server, StartError, free_port  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
STRESS = os.path.join(HERE, "stress.py")
REFERENCE = os.path.join(HERE, "reference_server.py")
# The figures worth a row, in this order (any others are left out).
FIGURES = ("msgs_per_s", "deliveries_per_s", "server_cpu_us_per_delivery",
           "latency_p50_ms", "latency_p99_ms", "round_trips_per_s",
           "server_cpu_us_per_round_trip", "rtt_p50_ms", "rtt_p99_ms", "pongs_per_s",
           "server_cpu_us_per_pong", "handshakes_per_s", "server_cpu_ms_per_handshake",
           "handshake_p50_ms", "logins_per_s", "login_p99_ms", "server_kb_per_client",
           "server_cpu_pct", "server_peak_rss_mb", "redis_calls_per_msg", "redis_cpu_s",
           "tool_cpu_pct", "tool_cpu_wait_pct")


class Side:
    """One of the two servers: how to start it for a run, and what stress.py
    is told about it."""

    def __init__(self, spec):
        words = shlex.split(spec)
        if not words:
            raise ValueError("an empty server")
        self.spec = spec
        self.kind, _, where = words[0].partition(":")
        self.options = words[1:]
        self.command = None
        if self.kind == "ours":
            self.tree = os.path.abspath(where or ROOT)
            workers = [] if any(o.startswith("--workers") for o in self.options) \
                else ["--workers", "4"]
            self.options = ["--spawn-server", "--broker", os.path.join(self.tree, "broker.py")] \
                + workers + self.options
        elif self.kind == "cluster":
            nodes, _, tree = where.partition(":")
            if not nodes.isdigit():
                raise ValueError("cluster:N, N a number of nodes: %r" % spec)
            self.tree = os.path.abspath(tree or ROOT)
            workers = [] if any(o.startswith("--workers") for o in self.options) \
                else ["--workers", "1"]
            self.options = ["--spawn-cluster", nodes, "--broker",
                            os.path.join(self.tree, "broker.py")] + workers + self.options
        elif self.kind == "reference":
            self.tree = ROOT
            self.command = [sys.executable, REFERENCE, "--port", "{port}",
                            "--idle-timeout", "600"]
        else:
            self.kind, self.tree = "command", None
            self.command, self.options = words, []
            if not any("{port}" in w for w in words):
                raise ValueError("a command needs {port} where its port goes: %r" % spec)

    def describe(self):
        """The spec, with the commit of the tree it runs when it is a git checkout."""
        if self.tree is None:
            return self.spec
        commit = subprocess.run(["git", "-C", self.tree, "log", "-1", "--format=%h"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True).stdout.strip()
        return "%s (%s)" % (self.spec, "commit " + commit if commit else self.tree)

    def run(self, scenario, stress_args, timeout):
        """One run against a fresh server: stress.py's result."""
        server = None
        options = list(self.options)
        if self.command:
            port = free_port()
            server = Server(port=port, command=[w.replace("{port}", str(port))
                                                for w in self.command],
                            die_with_parent=True).start(connect=True)
            options += ["--port", str(port), "--server-pid", str(server.proc.pid)]
        try:
            proc = subprocess.run([sys.executable, STRESS, scenario] + stress_args + options
                                  + ["--json"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, timeout=timeout, text=True)
        finally:
            code = server.shutdown(timeout=5) if server else None
        try:
            result = json.loads(proc.stdout)
        except ValueError:
            result = {"ok": False, "failures": {"no-result": 1},
                      "examples": {"no-result": [proc.stderr[-500:]]}}
        if server is not None and code != 0:
            result["ok"] = False
            result.setdefault("failures", {})["server-exit"] = 1
        result["load_avg_1m"] = os.getloadavg()[0]
        return result


def medians(results):
    """The median of every numeric figure over the runs."""
    out = {}
    for name in FIGURES + ("load_avg_1m",):
        values = [r[name] for r in results
                  if isinstance(r.get(name), (int, float)) and not isinstance(r[name], bool)]
        if values:
            out[name] = statistics.median(values)
    return out


def table(a, b, runs, sides):
    """Medians side by side, and B / A."""
    lines = ["A: " + sides[0].describe(), "B: " + sides[1].describe(),
             "%-30s %14s %14s %8s" % ("median of %d runs each" % runs, "A", "B", "B / A")]
    for name in FIGURES + ("load_avg_1m",):
        x, y = a.get(name), b.get(name)
        if x is None and y is None:
            continue
        ratio = "%.2f" % (y / x) if x and y is not None else "-"
        lines.append("%-30s %14s %14s %8s" % (name, "-" if x is None else "%.4g" % x,
                                              "-" if y is None else "%.4g" % y, ratio))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="compare.py", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("scenario", help="a scenario of stress.py: fanout, dm, ping, connect, "
                                    "handshake, churn")
    p.add_argument("--a", default="reference", metavar="SERVER",
                   help="the first server (default %(default)s)")
    p.add_argument("--b", default="ours", metavar="SERVER",
                   help="the second server (default %(default)s)")
    p.add_argument("--runs", type=int, default=3, help="runs of each (default %(default)s)")
    p.add_argument("--timeout", type=float, default=600, help="seconds a run may take")
    p.add_argument("--json", action="store_true",
                   help="print every run's result and the medians as one JSON object")
    args, stress_args = p.parse_known_args(argv)
    try:
        sides = [Side(args.a), Side(args.b)]
    except ValueError as exc:
        p.error(str(exc))
    results = ([], [])
    for k in range(args.runs):
        for i in ((0, 1) if k % 2 == 0 else (1, 0)):
            try:
                result = sides[i].run(args.scenario, stress_args, args.timeout)
            except (StartError, subprocess.TimeoutExpired) as exc:
                result = {"ok": False, "failures": {"fatal": 1}, "examples": {"fatal": [str(exc)]}}
            results[i].append(result)
            print("run %d %s: %s" % (k + 1, "AB"[i], "ok" if result.get("ok") else
                                     "FAILED %s" % result.get("failures")),
                  file=sys.stderr, flush=True)
    a, b = medians(results[0]), medians(results[1])
    if args.json:
        print(json.dumps({"a": args.a, "b": args.b, "medians": {"a": a, "b": b},
                          "runs": {"a": results[0], "b": results[1]}}))
    else:
        print(table(a, b, args.runs, sides))
    return 0 if all(r.get("ok") for side in results for r in side) else 1


if __name__ == "__main__":
    sys.exit(main())
