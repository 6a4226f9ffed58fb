#!/usr/bin/env python3
"""A cluster on this machine, to try by hand: a Redis and N nodes on loopback.

    python3 scripts/cluster.py up 3 [--workers 1] [--base-port 4000]

Starts a throw-away ``redis-server`` (no persistence) and N nodes sharing
it, prints each node's port (``nc 127.0.0.1 PORT``), then shows what the
nodes log. Type a command to play with faults:

    kill K        SIGKILL node K's whole process group
    start K       start node K again, on its port
    redis         restart Redis, empty (as a Redis without persistence does)
    ports         list the nodes

Ctrl-C (or SIGTERM) stops every node and Redis: no process is left behind.
"""

import argparse
import os
import select
import signal
import sys
import time

if not __package__:     # run as a file, python3 scripts/cluster.py: see __init__.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = os.path.basename(os.path.dirname(os.path.abspath(__file__)))

from .harness import REDIS_HINT, StartError, lease_left, redis_program, start_cluster  # noqa: E402


def show(cluster, seen, down, quiet):
    """Print what each node logged since last time, and who has died."""
    for k, node in enumerate(cluster.nodes):
        lines = node.log_lines_from(seen[k])
        seen[k] += len(lines)
        for line in [] if quiet else lines:
            print("[node%d] %s" % (k, line), flush=True)
        if node.proc.poll() is not None and k not in down:
            down.add(k)
            print("node%d (port %d) exited with status %s"
                  % (k, node.port, node.proc.returncode), flush=True)


def ports(cluster):
    for k, node in enumerate(cluster.nodes):
        state = "up" if node.proc.poll() is None else "down"
        print("node%d  127.0.0.1:%d  %s" % (k, node.port, state), flush=True)
    print("redis  %s" % cluster.redis.url, flush=True)


def start(node, k):
    """Start node ``k`` again. A node killed a moment ago still holds its
    id until its lease runs out: then wait that long, and try once more."""
    for attempt in (1, 2):
        mark = len(node.log_lines)
        try:
            node.restart()
            print("node%s listening on 127.0.0.1:%d again" % (k, node.port), flush=True)
            return
        except StartError:
            lines = node.log_lines_from(mark)
            lease = lease_left(lines)
            if attempt == 2 or lease is None:
                print("node%s did not start: %s" % (k, lines[-1] if lines else "?"),
                      flush=True)
                return
            print("node%s's id is held by its lease for %.1f s more: waiting"
                  % (k, lease), flush=True)
            time.sleep(lease + 0.5)


def command(cluster, line, down):
    """Run one typed command; False at the end of the input."""
    if not line:
        return False
    word, _, arg = line.strip().partition(" ")
    node = cluster.nodes[int(arg)] if arg.isdigit() and int(arg) < len(cluster.nodes) else None
    if word == "kill" and node is not None:
        node.kill()
        print("killed node%s" % arg, flush=True)
    elif word == "start" and node is not None:
        start(node, arg)
        down.discard(int(arg))
    elif word == "redis":
        cluster.redis.restart()
        print("redis restarted, empty, on port %d" % cluster.redis.port, flush=True)
    elif word == "ports":
        ports(cluster)
    elif word:
        print("commands: kill K, start K, redis, ports (Ctrl-C stops all)", flush=True)
    return True


def up(args):
    cluster = start_cluster(args.nodes, workers=args.workers, base_port=args.base_port,
                            name=args.cluster, extra_args=args.server_arg,
                            die_with_parent=True)
    try:
        print("a cluster of %d nodes, %d worker(s) each, on one Redis:"
              % (args.nodes, args.workers), flush=True)
        ports(cluster)
        print("try: nc 127.0.0.1 %d; type kill K, start K, redis or ports; "
              "Ctrl-C stops all" % cluster.nodes[0].port, flush=True)
        seen, down, reading = [len(node.log_lines) for node in cluster.nodes], set(), True
        while True:
            show(cluster, seen, down, args.quiet)
            if not reading:
                time.sleep(0.2)
            elif select.select([sys.stdin], [], [], 0.2)[0]:
                reading = command(cluster, sys.stdin.readline(), down)
    except KeyboardInterrupt:
        pass
    finally:
        print("\nstopping %d nodes and redis" % len(cluster.nodes), flush=True)
        cluster.stop()
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    u = sub.add_parser("up", help="start a Redis and N nodes; Ctrl-C stops them")
    u.add_argument("nodes", type=int, metavar="N")
    u.add_argument("--workers", type=int, default=1, help="workers per node (default 1)")
    u.add_argument("--base-port", type=int, default=None,
                   help="node K listens on BASE+K (default: free ports)")
    u.add_argument("--cluster", default="chat", help="the cluster's name (default chat)")
    u.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="extra option for every node (repeat; use --server-arg=--x)")
    u.add_argument("--quiet", action="store_true", help="do not show the nodes' logs")
    args = p.parse_args(argv)
    if args.nodes < 1:
        p.error("N must be at least 1")
    if redis_program() is None:
        print(REDIS_HINT, file=sys.stderr)
        return 2

    def on_signal(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    return up(args)


if __name__ == "__main__":
    sys.exit(main())
