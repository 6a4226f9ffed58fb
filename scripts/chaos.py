#!/usr/bin/env python3
"""Chaos run: SIGKILL server processes under steady chat load, and check
that the server keeps the promises of the README's protocol meanwhile.

    python3 scripts/chaos.py --duration 60 --workers 4 [--interval 3] [--seed N]

Starts ``broker.py`` in a session of its own, keeps ``--clients`` users
chatting from one selectors loop, and every few seconds SIGKILLs a worker,
the broker or the acceptor, found by its process title. A user whose
connection dies comes back under a new name (``u07-2``). Then the load
stops, two ``WHO``/``PING`` barriers make sure everything sent has arrived,
and the oracle checks what the users got (``chaoslib/oracle.py`` lists the
promises).

With ``--cluster N`` it starts a Redis and N nodes sharing it (users spread
over the nodes) and also kills whole nodes (SIGKILL of the process group; the
node comes back once its lease has run out) and restarts Redis, empty, and
checks cluster mode's promises across the nodes.

    python3 scripts/chaos.py --cluster 2 --workers 2 --duration 60

Each violation is printed with the kills around it; exit status 1 if any,
2 if the server would not start. The parts are in ``chaoslib/``: the
users' loop, the oracle, the faults, and the journal that reports.
"""

import argparse
import os
import random
import signal
import sys
import time

if not __package__:     # run as a file, python3 scripts/chaos.py: see __init__.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = os.path.basename(os.path.dirname(os.path.abspath(__file__)))

from .chaoslib.clients import Clients  # noqa: E402
from .chaoslib.faults import CLUSTER_ROLES, ROLES, Faults, Logins  # noqa: E402
from .chaoslib.journal import Journal  # noqa: E402
from .chaoslib.oracle import Oracle  # noqa: E402
from .harness import Server, StartError, start_cluster  # noqa: E402

PHASE_TIMEOUT = 30.0    # settling, and each barrier
STATUS_EVERY = 10.0


class Chaos:
    """One run: the servers, and the loop that drives the users, the
    faults and the checks through the phases (first logins, load, settling,
    barriers, the checks at the end)."""

    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.journal = Journal()
        self.nodes = []             # the server, or the nodes of the cluster
        self.redis = None
        self.phase = "starting"
        self.next_timers = self.next_watch = 0.0
        self.next_probe = self.next_status = float("inf")

    def start(self):
        """The servers, then the parts that work on them."""
        a = self.args
        extra = ("--heartbeat-timeout", a.heartbeat_timeout,
                 "--max-per-ip", "0")              # every client comes from 127.0.0.1
        if a.cluster:
            cluster = start_cluster(a.cluster, workers=a.workers, name="chaos",
                                    extra_args=extra + ("--node-lease", a.node_lease),
                                    die_with_parent=True)
            self.nodes, self.redis = cluster.nodes, cluster.redis
        else:
            self.nodes = [Server(*extra, workers=a.workers, die_with_parent=True).start()]
        self.logins = Logins(self.nodes, bool(a.cluster))
        self.clients = Clients(a, self.rng, self.journal, self.nodes, self.logins)
        self.faults = Faults(a, self.rng, self.journal, self.nodes, self.redis, self.logins,
                             self.clients.held)
        self.oracle = Oracle(a, self.journal, self.clients, self.faults, self.logins, self.nodes)
        self.clients.faults, self.clients.oracle = self.faults, self.oracle

    def stop(self):
        for node in self.nodes:
            node.kill()
        if self.redis:
            self.redis.stop()

    def log(self):
        return "\n".join(("== node%d ==\n" % k if self.redis else "") + node.log()
                         for k, node in enumerate(self.nodes))

    def step(self):
        """One loop turn: I/O, then whatever timers are due in this phase."""
        self.clients.poll(0.02)
        self.logins.read()
        mono = time.monotonic()
        if mono < self.next_timers:
            return
        self.next_timers = mono + 0.01
        for k in self.faults.up():
            if self.nodes[k].proc.poll() is not None:
                raise RuntimeError("%s exited with status %s" % (
                    "node%d" % k if self.redis else "the server", self.nodes[k].proc.returncode))
        self.faults.restart_nodes(mono)
        loading = self.phase == "load"
        self.clients.timers(mono, loading)
        if loading:
            self.faults.due(mono)
            if mono >= self.next_probe:
                self.next_probe = mono + self.args.probe_interval
                self.clients.probe()
            if mono >= self.next_status:
                self.next_status = mono + STATUS_EVERY
                self.status()
        if mono >= self.next_watch:
            self.next_watch = mono + 0.05
            self.faults.watch_replacements()

    def run_until(self, done, what):
        deadline = time.monotonic() + PHASE_TIMEOUT
        while not done():
            if time.monotonic() > deadline:
                self.journal.violation("stuck", "%s not done within %.0f s" % (what, PHASE_TIMEOUT))
                return False
            self.step()
        return True

    def status(self):
        c = self.journal.counts
        self.journal.say("status: %d users logged in, %d kills, sent %d MSG %d DM, received "
                         "%d MSG %d DM %d INFO, %d connections lost"
                         % (len(self.clients.live()), len(self.faults.kills), c["MSG sent"],
                            c["DM sent"], c["MSG received"], c["DM received"],
                            c["INFO received"], c["connections lost"]))

    def run(self):
        args, say = self.args, self.journal.say
        self.start()
        self.journal.t0 = time.monotonic()
        say("%s listening on port %s (pid %s)%s; %d clients, seed %d" % (
            "%d nodes" % len(self.nodes) if self.redis else "server",
            ", ".join(str(n.port) for n in self.nodes),
            ", ".join(str(n.proc.pid) for n in self.nodes),
            ", redis on port %d" % self.redis.port if self.redis else "",
            args.clients, args.seed))
        clients = self.clients
        for i in range(args.clients):
            clients.connect("u%02d" % i, "u%02d" % i, 1)
        self.run_until(lambda: not clients.logging_in(), "first logins")
        self.phase = "load"
        start = time.monotonic()
        self.faults.start(start)
        self.next_probe = start + args.probe_interval / 2
        self.next_status = start + STATUS_EVERY
        while time.monotonic() - start < args.duration:
            self.step()
        self.phase = "settle"
        self.status()
        say("load stopped; waiting for replacements, reconnects and two barriers")
        self.run_until(lambda: self.faults.all_replaced() and not clients.reconnects
                       and time.monotonic() >= self.faults.quiet_until
                       and not clients.logging_in(), "settling")
        for n in (1, 2):
            # A PONG after a user's last line means the broker has it; a WHO
            # sent after every such PONG is answered after all of it was routed.
            goal = {u: u.barriers + len(u.whos) + 1 for u in clients.live()}
            for u in goal:
                clients.ask_who(u)
            self.run_until(lambda: all(u.barriers >= g or u.state != "in"
                                       for u, g in goal.items()), "barrier %d" % n)
        if self.redis:
            # Between nodes a barrier proves nothing: what crosses goes through
            # Redis. Wait until what is due from every survivor has come.
            self.run_until(self.oracle.streams_complete, "delivery between nodes")
        self.oracle.check_all()

    def summary(self):
        return self.journal.summary(self.args, self.faults.kills,
                                    CLUSTER_ROLES if self.redis else ROLES)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load and kills")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--interval", type=float, default=3.0, help="seconds between kills (+-20%%)")
    p.add_argument("--seed", type=int, default=None, help="default: a random one, printed")
    p.add_argument("--clients", type=int, default=40)
    p.add_argument("--rate", type=float, default=1.0, help="actions per second per client")
    p.add_argument("--probe-interval", type=float, default=2.0,
                   help="seconds between duplicate-LOGIN attempts")
    p.add_argument("--cluster", type=int, default=0, metavar="N",
                   help="a Redis and N nodes sharing it, instead of one server")
    p.add_argument("--node-lease", type=float, default=3.0,
                   help="the nodes' --node-lease (default %(default)s s: faults play out "
                        "quickly)")
    p.add_argument("--roles", default=None,
                   help="comma-separated roles to kill, of %s; with --cluster also node "
                        "(a whole node) and redis (a restart) (default: all)" % ", ".join(ROLES))
    p.add_argument("--kill-order", choices=("random", "cycle"), default="random",
                   help="cycle: kill the --roles in turn, so each is hit")
    p.add_argument("--heartbeat-timeout", type=float, default=3.0)
    p.add_argument("--server-log", metavar="PATH", help="write the server's log here")
    args = p.parse_args(argv)
    roles = CLUSTER_ROLES if args.cluster else ROLES
    args.roles = [r for r in (args.roles or ",".join(roles)).split(",") if r]
    if not args.roles or set(args.roles) - set(roles):
        p.error("--roles takes a comma-separated list of %s" % ", ".join(roles))
    if args.seed is None:
        args.seed = random.randrange(1 << 30)
    return args


def main(argv=None):
    args = parse_args(argv)

    def on_signal(signum, frame):
        raise SystemExit(128 + signum)         # so that the finally below runs
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    chaos = Chaos(args)
    try:
        chaos.run()
    except (RuntimeError, StartError) as exc:
        chaos.journal.violation("server", str(exc))
        if not chaos.nodes:
            print(exc, file=sys.stderr)
            return 2
    finally:
        chaos.stop()
        if args.server_log:
            with open(args.server_log, "w") as f:
                f.write(chaos.log() + "\n")
    return chaos.summary()


if __name__ == "__main__":
    sys.exit(main())
