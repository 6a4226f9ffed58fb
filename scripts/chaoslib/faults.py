"""The faults of a chaos run: SIGKILL of a server process found by its
title, of a whole node, a restart of Redis; and which process replaced
each one."""

import os
import re
import signal
import time
from collections import Counter

from ..harness import lease_left
from ..procfs import process_age

ROLES = ("worker", "broker", "acceptor")
CLUSTER_ROLES = ROLES + ("node", "redis")
MIN_AGE = 1.5           # the supervisor gives up on a child that keeps dying
                        # within 1 s of its start: never kill one that young
REPLACE_TIMEOUT = 10.0  # a killed process must have a successor by then
CUT_WINDOW = 5.0        # a connection lost this soon after a worker kill is explained
LOGGED_IN = re.compile(r" (worker-\d+)\[(\d+)\] (\S+) logged in from ")


class Logins:
    """Which worker of which node holds each user, from the nodes' logs."""

    def __init__(self, nodes, cluster):
        self.nodes = nodes
        self.cluster = cluster
        self.seen = [0] * len(nodes)
        self.worker_of = {}         # user name -> (node, title, pid) of its worker

    def read(self):
        """Take in what the nodes have logged since the last call."""
        for k, node in enumerate(self.nodes):
            lines = node.log_lines_from(self.seen[k])
            self.seen[k] += len(lines)
            for line in lines:
                m = LOGGED_IN.search(line)
                if m:
                    self.worker_of[m.group(3)] = (k, "chat-" + m.group(1), int(m.group(2)))

    def where(self, name):
        """The worker holding ``name``, as the log says: for reports."""
        k, title, pid = self.worker_of.get(name, ("?", "chat-worker-?", 0))
        return "%s%s pid %d" % ("node%s " % k if self.cluster else "", title[5:], pid)


class Kill:
    """A SIGKILL of a process (``title`` ``chat-worker-1`` ...) or of a whole
    node (``node``), or a restart of Redis (``redis``)."""

    def __init__(self, number, tick, at, title, pid, node=None, cluster=False):
        self.number = number
        self.tick = tick
        self.at = at                # seconds since the start of the load
        self.title = title
        self.pid = pid
        self.node = node            # the node's index, but for redis
        self.role = title.split("-")[1] if title.startswith("chat-") else title
        self.what = (("node%d " % node if cluster else "") + title[5:]
                     if title.startswith("chat-") else
                     "node%d" % node if title == "node" else title)
        self.replaced_by = None
        self.replaced_in = None
        self.cut = []               # names whose connection died right after
        self.blamed = Counter()     # violation kind -> how many seem to follow from it

    def __str__(self):
        return "kill #%d (%s pid %d at %.2f s)" % (self.number, self.what, self.pid, self.at)


class Faults:
    """Kills in turn (or at random) every ``--interval``, and the watch for
    their replacements. ``held(node, pid)`` counts the users a node, or a
    worker, holds: for the messages."""

    def __init__(self, args, rng, journal, nodes, redis, logins, held):
        self.args = args
        self.rng = rng
        self.journal = journal
        self.nodes = nodes
        self.redis = redis
        self.logins = logins
        self.held = held
        self.kills = []
        self.role_turn = 0
        self.next_kill = float("inf")
        self.down = set()           # nodes killed and not yet back
        self.restarts = []          # (when, node) to start again
        self.relaunched = {}        # node -> its first log line since it was started again
        self.quiet_until = 0.0      # no node kill or Redis restart before then

    def up(self):
        return [k for k in range(len(self.nodes)) if k not in self.down]

    def kills_around(self, at):
        """The kills just before and just after ``at``: where to look for the cause."""
        before = [k for k in self.kills if k.at <= at]
        after = [k for k in self.kills if k.at > at]
        parts = []
        if before:
            parts.append("%.2f s after %s" % (at - before[-1].at, before[-1]))
        if after:
            parts.append("%.2f s before %s" % (after[0].at - at, after[0]))
        return "; ".join(parts) or "no kill yet"

    def near_redis_restart(self, at, before, after):
        return any(k.role == "redis" and k.at - before <= at <= k.at + after
                   for k in self.kills)

    def unavailable_ok(self):
        """Requests may be told ERR unavailable while Redis comes back, and
        for a lease after it came back empty (no new name then)."""
        return self.near_redis_restart(self.journal.now(), 0.0, self.args.node_lease + 8.0)

    def culprit(self, u):
        """The kill that explains why ``u`` lost its connection, or None."""
        self.logins.read()
        where = self.logins.worker_of.get(u.name)
        culprits = [k for k in self.kills if k.role == "node" and k.node == u.node
                    and k.at >= u.connected_at]
        if not culprits and where is not None:
            culprits = [k for k in self.kills if k.pid == where[2]]
        elif not culprits:      # not logged in yet: which worker had it is not in the log
            culprits = [k for k in self.kills if k.role == "worker" and k.node == u.node
                        and u.left_at - k.at <= CUT_WINDOW]
        return culprits[-1] if culprits else None

    def start(self, at):
        self.next_kill = at + self.args.interval

    def due(self, mono):
        """The next role's fault, if its time has come and it can be done safely now."""
        if mono < self.next_kill:
            return
        roles = self.args.roles
        if self.args.kill_order == "cycle":
            role = roles[self.role_turn % len(roles)]
        else:
            role = self.rng.choice(roles)
        if not (self.node_fault(role) if role in ("node", "redis") else self.kill_process(role)):
            self.next_kill = time.monotonic() + 0.2      # its successor is still young
            return
        self.role_turn += 1
        self.next_kill = time.monotonic() + self.args.interval * self.rng.uniform(0.8, 1.2)

    def record(self, title, pid, node=None):
        kill = Kill(len(self.kills) + 1, self.journal.next_tick(), self.journal.now(), title,
                    pid, node, self.redis is not None)
        self.kills.append(kill)
        return kill

    def kill_process(self, role):
        """SIGKILL a process of ``role`` on a node that is up, if one is old
        enough to die safely."""
        candidates = sorted((k, title, pid) for k in self.up()
                            for title, pids in self.nodes[k].titles().items() if title
                            and (title == "chat-" + role or title.startswith("chat-%s-" % role))
                            for pid in pids if process_age(pid) >= MIN_AGE)
        if not candidates:
            return False
        k, title, pid = self.rng.choice(candidates)
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            return False
        kill = self.record(title, pid, k)
        self.journal.say("kill #%d: SIGKILL %s%s (pid %d)%s" % (
            kill.number, title, " of node%d" % k if self.redis else "", pid,
            ", which holds %d users" % self.held(k, pid) if role == "worker" else ""))
        return True

    def node_fault(self, role):
        """SIGKILL a whole node (it starts again once its lease has run out),
        or restart Redis, empty. One such fault at a time, while every node
        is up, and once the last one has played out (a dead node's users
        announced, names registered again after Redis came back)."""
        mono = time.monotonic()
        k = self.rng.randrange(len(self.nodes))
        if self.down or mono < self.quiet_until or (role == "node" and (
                len(self.nodes) < 2 or process_age(self.nodes[k].proc.pid) < MIN_AGE)):
            return False
        self.quiet_until = mono + self.args.node_lease + 3.0
        say = self.journal.say
        if role == "redis":
            kill = self.record("redis", self.redis.proc.pid)
            self.redis.restart()
            kill.replaced_by, kill.replaced_in = self.redis.proc.pid, self.journal.now() - kill.at
            say("kill #%d: restarted redis (pid %d), empty: pid %d after %.2f s"
                % (kill.number, kill.pid, kill.replaced_by, kill.replaced_in))
            return True
        node = self.nodes[k]
        held = self.held(k)
        kill = self.record("node", node.proc.pid, k)
        node.kill()
        self.down.add(k)
        self.restarts.append((mono + self.args.node_lease + 0.5, k))
        say("kill #%d: SIGKILL node%d's process group (pid %d), which holds %d users"
            % (kill.number, k, kill.pid, held))
        return True

    def restart_nodes(self, mono):
        """Start again the killed nodes whose time has come."""
        for when, k in [r for r in self.restarts if r[0] <= mono]:
            self.restarts.remove((when, k))
            self.relaunched[k] = len(self.nodes[k].log_lines)
            self.nodes[k].relaunch()

    def all_replaced(self):
        return all(k.replaced_by is not None for k in self.kills)

    def watch_replacements(self):
        pending = [k for k in self.kills if k.replaced_by is None]
        if not pending:
            return
        titles = {n: self.nodes[n].titles() for n in self.up()}
        killed = {k.pid for k in self.kills}
        for k in pending:
            if k.role == "node":
                self.watch_node(k)
                continue
            fresh = [pid for pid in titles.get(k.node, {}).get(k.title, ()) if pid not in killed]
            if fresh:
                k.replaced_by, k.replaced_in = fresh[0], self.journal.now() - k.at
                self.journal.say("%s replaced by pid %d after %.2f s"
                                 % (k, fresh[0], k.replaced_in))
            elif self.journal.now() - k.at > REPLACE_TIMEOUT and k.node not in self.down:
                k.replaced_by = 0
                self.journal.violation("replace", "%s: no successor within %.0f s"
                                       % (k, REPLACE_TIMEOUT))

    def watch_node(self, kill):
        """A killed node started again: listening, or refused because its
        id was still leased (then again later)."""
        node = self.nodes[kill.node]
        if kill.node not in self.relaunched:
            return
        if node.listening:
            self.down.discard(kill.node)
            del self.relaunched[kill.node]
            kill.replaced_by, kill.replaced_in = node.proc.pid, self.journal.now() - kill.at
            self.journal.say("%s: node%d listens again (pid %d) after %.2f s"
                             % (kill, kill.node, node.proc.pid, kill.replaced_in))
        elif node.proc.poll() is not None:
            lines = node.log_lines_from(self.relaunched.pop(kill.node))
            lease = lease_left(lines)
            if lease is None or \
                    self.journal.now() - kill.at > self.args.node_lease + REPLACE_TIMEOUT:
                kill.replaced_by = 0
                self.journal.violation("replace", "%s: the node did not start again: %s"
                                       % (kill, lines[-1] if lines else "no log"))
            else:
                self.restarts.append((time.monotonic() + lease + 0.2, kill.node))
