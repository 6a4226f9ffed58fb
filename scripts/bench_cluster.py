#!/usr/bin/env python3
"""Cluster mode against one host, side by side in one run.

Alternates, ``--runs`` times: one node with two workers, then two nodes of
one worker each on one Redis (clients split evenly over the nodes), each
started fresh for every workload. The load is ``../shared/bench/loadgen.py``
(run as a program, never imported): ``fanout`` and ``dm``. For the cluster
it also reads Redis's ``INFO commandstats`` and ``INFO cpu`` around the
fan-out, for commands per MSG and Redis CPU per million deliveries.

Prints one JSON line per measurement, then the medians and ratios.

    python3 scripts/bench_cluster.py --runs 3
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

if not __package__:     # run as a file, python3 scripts/bench_cluster.py: see __init__.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = os.path.basename(os.path.dirname(os.path.abspath(__file__)))

from .harness import ROOT, Server, start_cluster  # noqa: E402

LOADGEN = os.path.join(os.path.dirname(ROOT), "shared", "bench", "loadgen.py")


def loadgen(scenario, ports, pids, args):
    cmd = [sys.executable, LOADGEN, scenario, "--port", ",".join(map(str, ports)),
           "--server-pid", ",".join(map(str, pids)), "--json"] + args
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    lines = out.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError("loadgen printed nothing: %s" % out.stderr[-2000:])
    return json.loads(lines[-1])


def run_single(scenario, args):
    with Server("--idle-timeout", 600, "--max-per-ip", 0, "--rate", 0, workers=2) as node:
        return loadgen(scenario, [node.port], [node.proc.pid], args)


def run_cluster(scenario, args):
    with start_cluster(2, workers=1, extra_args=("--idle-timeout", 600, "--max-per-ip", 0, "--rate", 0)) as cluster:
        before = cluster.redis.usage()
        result = loadgen(scenario, cluster.ports, [n.proc.pid for n in cluster.nodes], args)
        after = cluster.redis.usage()
        result["redis_calls"] = after[0] - before[0]
        result["redis_cpu_s"] = round(after[1] - before[1], 3)
        return result


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--senders", type=int, default=10)
    p.add_argument("--pairs", type=int, default=50)
    p.add_argument("--duration", type=float, default=10)
    opts = p.parse_args()
    workloads = {
        "fanout": ["--clients", str(opts.clients), "--senders", str(opts.senders),
                   "--duration", str(opts.duration)],
        "dm": ["--pairs", str(opts.pairs), "--duration", str(opts.duration)],
    }
    results = {(w, s): [] for w in workloads for s in ("single", "cluster")}
    for run in range(opts.runs):
        for workload, args in workloads.items():
            for setup, runner in (("single", run_single), ("cluster", run_cluster)):
                res = runner(workload, args)
                res.update(run=run, setup=setup)
                print(json.dumps(res, sort_keys=True), flush=True)
                results[(workload, setup)].append(res)

    def median(workload, setup, field):
        values = [r[field] for r in results[(workload, setup)] if r.get(field) is not None]
        return statistics.median(values) if values else None

    summary = {}
    for field in ("deliveries_per_s", "server_cpu_pct", "lat_p50_ms", "lat_p99_ms"):
        single, cluster = median("fanout", "single", field), median("fanout", "cluster", field)
        summary["fanout_" + field] = [single, cluster, round(cluster / single, 3) if single else None]
    def cpu_per_delivery(setup):
        return statistics.median(r["server_cpu_pct"] / 100 / r["deliveries_per_s"] * 1e6
                                 for r in results[("fanout", setup)])
    single, cluster = cpu_per_delivery("single"), cpu_per_delivery("cluster")
    summary["fanout_server_cpu_us_per_delivery"] = [round(single, 4), round(cluster, 4),
                                                    round(cluster / single, 3)]
    for field in ("rtt_p50_ms", "rtt_p99_ms"):
        single, cluster = median("dm", "single", field), median("dm", "cluster", field)
        summary["dm_" + field] = [single, cluster, round(cluster / single, 3) if single else None]
    fan = results[("fanout", "cluster")]
    summary["fanout_delivery_ratios"] = [r.get("delivery_ratio") for r in
                                         results[("fanout", "single")] + fan]
    summary["redis_calls_per_msg"] = statistics.median(
        r["redis_calls"] / max(1, r.get("sent", 1)) for r in fan)
    summary["redis_cpu_s_per_million_deliveries"] = statistics.median(
        r["redis_cpu_s"] / max(1, r.get("delivered", 1)) * 1e6 for r in fan)
    print(json.dumps({"summary": summary, "format": "[single, cluster, cluster/single]"},
                     sort_keys=True))


if __name__ == "__main__":
    main()
