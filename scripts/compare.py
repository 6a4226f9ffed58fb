#!/usr/bin/env python3
"""Side-by-side benchmark: this server against a reference server, same run.

The machines we measure on are shared and noisy, so a single absolute figure
means little. This script starts a fresh server for every run, alternates the
servers (A B A B ...), drives each with the same load generator and prints
the median of every figure and the ratio ours/reference.

    python3 scripts/compare.py fanout --clients 1000 --senders 10 --duration 5
    python3 scripts/compare.py dm --pairs 50 --duration 5 --runs 5
    python3 scripts/compare.py ping --clients 100 --duration 5 --ours-arg=--workers=2

Everything after the scenario name goes to the load generator unchanged.
The load generator and the references live outside the product, in
``--bench`` (default ``../shared/bench`` next to the repository).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

if not __package__:     # run as a file, python3 scripts/compare.py: see __init__.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = os.path.basename(os.path.dirname(os.path.abspath(__file__)))

from .harness import ROOT, Server, free_port  # noqa: E402

FIGURES = ("deliveries_per_s", "delivery_ratio", "lat_p50_ms", "lat_p99_ms",
           "rtt_p50_ms", "rtt_p99_ms", "pings_per_s", "logins_per_s",
           "rss_per_conn_kb", "server_cpu_s_per_m_deliveries", "server_cpu_pct",
           "loadgen_cpu_pct")


def spawn(kind, args):
    """A fresh server of ``kind`` on a free port below the ephemeral range
    (a server port inside it can be taken as a source port by one of
    thousands of client connections), once it takes connections."""
    port = free_port()
    if kind == "ours":
        server = Server("--idle-timeout", "600", "--rate", "0", "--max-per-ip", "0",
                        "--log-level", "WARNING", *args.ours_arg, port=port, workers=None,
                        die_with_parent=True)
    else:
        path = os.path.join(args.bench, "ref", "%s_server.py" % kind)
        server = Server("--port", port, "--idle-timeout", "600", port=port,
                        command=[sys.executable, path], die_with_parent=True)
    return server.start(connect=True)


def run_once(kind, args):
    """Start a fresh server, run the load generator once, stop the server."""
    server = spawn(kind, args)
    try:
        gen = subprocess.run(
            [sys.executable, os.path.join(args.bench, "loadgen.py"), args.scenario,
             "--port", str(server.port), "--server-pid", str(server.proc.pid)]
            + args.loadgen_args,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=args.timeout)
        lines = gen.stdout.decode().strip().splitlines()
        result = json.loads(lines[-1]) if lines else {}
        result["exit"] = gen.returncode
        return result
    finally:
        server.shutdown(timeout=5)


def cpu_per_million(result):
    """Server CPU seconds per million deliveries, if the generator says enough."""
    cpu, rate = result.get("server_cpu_pct"), result.get("deliveries_per_s")
    if cpu and rate:
        return cpu / 100.0 / rate * 1e6
    return None


def summarise(results):
    """Median of every numeric figure over the runs."""
    out = {}
    for name in FIGURES:
        values = [r[name] for r in results if isinstance(r.get(name), (int, float))]
        if values:
            out[name] = statistics.median(values)
    out["exits"] = [r["exit"] for r in results]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("scenario", choices=["fanout", "dm", "connect", "ping"])
    p.add_argument("--runs", type=int, default=3, help="runs per server (default 3)")
    p.add_argument("--reference", default="asyncio", choices=["asyncio", "threaded"])
    p.add_argument("--ours-arg", action="append", default=[],
                   help="extra option for broker.py, e.g. --ours-arg=--workers=2")
    p.add_argument("--bench", default=os.path.join(os.path.dirname(ROOT), "shared", "bench"),
                   help="folder holding loadgen.py and ref/ (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per run")
    args, args.loadgen_args = p.parse_known_args(argv)
    if not any(a.startswith("--workers") for a in args.ours_arg):
        args.ours_arg.append("--workers=4")
    runs = {"ours": [], args.reference: []}
    for _ in range(args.runs):
        for kind in runs:
            result = run_once(kind, args)
            result["server_cpu_s_per_m_deliveries"] = cpu_per_million(result)
            runs[kind].append(result)
    ours, ref = summarise(runs["ours"]), summarise(runs[args.reference])
    print("%-32s %14s %14s %8s" % ("median of %d runs" % args.runs, "ours", args.reference, "ratio"))
    for name in FIGURES:
        if name in ours or name in ref:
            a, b = ours.get(name), ref.get(name)
            ratio = "%.2f" % (a / b) if a is not None and b else "-"
            print("%-32s %14s %14s %8s" % (name, "%.4g" % a if a is not None else "-",
                                           "%.4g" % b if b is not None else "-", ratio))
    print("%-32s %14s %14s" % ("generator exit codes", ours["exits"], ref["exits"]))
    return 0 if all(e == 0 for e in ours["exits"]) else 1


if __name__ == "__main__":
    sys.exit(main())
