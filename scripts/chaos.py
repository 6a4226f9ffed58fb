#!/usr/bin/env python3
"""Chaos run: SIGKILL server processes under steady chat load, and check
that the server keeps the promises of PROTOCOL.md meanwhile (issue 5).

    python3 scripts/chaos.py --duration 60 --workers 4 [--interval 3] [--seed N]

Starts ``broker.py`` in a session of its own, keeps ``--clients`` users
chatting from one selectors loop (numbered ``MSG`` and ``DM`` lines, ``WHO``,
and now and then a ``LOGIN`` of a name somebody holds), and every few seconds
SIGKILLs a worker, the broker or the acceptor, found by its process title.
A user whose connection dies comes back under a new name (``u07-2``). Then
the load stops, two ``WHO``/``PING`` barriers make sure everything sent has
arrived, and it checks:

* per sender, receiver and kind (MSG, DM), the numbers received go up by one:
  no duplicate, no gap; and all a sender sent after the receiver's ``OK``
  arrives, but for the tail of a sender whose connection died;
* every user that left is announced exactly once to every survivor that had
  logged in before, and nobody who is still there is announced;
* no ``WHO`` lists a name twice, or a user its asker was told had left, or
  misses a user logged in before it who never left; a ``LOGIN`` of a held
  name gets ``ERR username-taken``;
* afterwards a new session works, and every killed process has exactly one
  replacement.

With ``--cluster N`` it starts a Redis and N nodes sharing it (users spread
over the nodes) and also kills whole nodes (SIGKILL of the process group; the
node comes back once its lease has run out) and restarts Redis, empty. It
then checks the same promises across nodes, as issue 12 states them: a
user's ``INFO`` exactly once to everyone, after its last ``MSG`` (for a dead
node's users, once its lease has run out), per-sender order, and nothing lost
for a reader while its node and Redis are up: lines between two nodes sent
within a moment of a Redis restart may be lost (they lived in Redis), and
``ERR unavailable`` may answer a request then.

    python3 scripts/chaos.py --cluster 2 --workers 2 --duration 60

Each violation is printed with the kills around it; exit status 1 if any,
2 if the server would not start.
"""

import argparse
import os
import random
import re
import selectors
import signal
import socket
import sys
import time
from collections import Counter, defaultdict, deque

if not __package__:     # run as a file, python3 scripts/chaos.py: see __init__.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = os.path.basename(os.path.dirname(os.path.abspath(__file__)))

from .harness import IO_TIMEOUT, Server, StartError, lease_left, start_cluster  # noqa: E402
from .procfs import process_age  # noqa: E402

ROLES = ("worker", "broker", "acceptor")
CLUSTER_ROLES = ROLES + ("node", "redis")
READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE

MIN_AGE = 1.5           # the supervisor gives up on a child that keeps dying
                        # within 1 s of its start: never kill one that young
REPLACE_TIMEOUT = 10.0  # a killed process must have a successor by then
LOGIN_TIMEOUT = 20.0    # a LOGIN must be answered by then, broker restart or not
PHASE_TIMEOUT = 30.0    # settling, and each barrier
CUT_WINDOW = 5.0        # a connection lost this soon after a worker kill is explained
SLACK = 3.0             # on top of a promised delay, for a machine busy with other work
IN_REDIS = (2.0, 1.0)   # lines between nodes sent this long before (after) a Redis
                        # restart may be lost with it
STATUS_EVERY = 10.0
SHOWN = 25              # violations printed per kind; the rest are counted
LOGGED_IN = re.compile(r" (worker-\d+)\[(\d+)\] (\S+) logged in from ")


class Logins:
    """Which worker of which node holds each user, from the nodes' logs."""

    def __init__(self, nodes):
        self.nodes = nodes
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


# -- what the checker knows ------------------------------------------------------

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


class User:
    """One name, and the one connection that holds (or claims) it.

    ``tick`` values order the checker's own events: a line queued with a
    tick above a user's ``ok_tick`` was sent after that user saw its ``OK``.
    """

    def __init__(self, name, base, gen, node, at, probe_of=None):
        self.name = name
        self.base = base
        self.gen = gen
        self.node = node            # the index of the node it connects to
        self.connected_at = at
        self.probe_of = probe_of    # for a duplicate-LOGIN probe: the holder
        self.sock = None
        self.inbuf = b""
        self.outbuf = b""
        self.state = "login"        # then "in", then "gone"
        self.login_deadline = 0.0
        self.refused = False        # a probe that got ERR username-taken
        self.ok_tick = None
        self.ok_at = None
        self.left_tick = None       # when it left: its worker's kill, if that is why,
        self.left_at = None         # else when the checker closed or lost it
        self.killed_by = None
        self.msgs = []              # (tick, at) of MSG number i+1
        self.dms = defaultdict(list)   # target name -> (tick, at) of DM number i+1
        self.got = {}               # (sender, kind) -> [first, last] number received
        self.infos = Counter()      # name -> INFO lines received
        self.info_tick = {}         # name -> tick of the first one
        self.info_at = {}           # name -> when the first one came
        self.whos = deque()         # [tick sent, names so far] per WHO+PING out,
                                    # answered in order: USER lines go to the first
        self.barriers = 0           # WHO/PING round trips completed
        self.next_action = 0.0


class Chaos:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.nodes = []             # the server, or the nodes of the cluster
        self.redis = None
        self.logins = None
        self.down = set()           # nodes killed and not yet back
        self.restarts = []          # (when, node) to start again
        self.relaunched = {}        # node -> its first log line since it was started again
        self.quiet_until = 0.0      # no node kill or Redis restart before then
        self.sel = selectors.DefaultSelector()
        self.users = {}             # every name ever used -> User
        self.active = set()         # the Users with a connection
        self.next_timers = 0.0
        self.next_watch = 0.0
        self.tick = 0
        self.t0 = time.monotonic()
        self.phase = "starting"
        self.kills = []
        self.role_turn = 0
        self.next_kill = self.next_probe = self.next_status = float("inf")
        self.reconnects = []        # (when, base, gen)
        self.violations = defaultdict(list)   # kind -> messages
        self.lines_hit = defaultdict(set)     # "lost"/"duplicate" -> (kind, sender, number)
        self.who_missing = []       # (asker, answered at, names it lacked)
        self.counts = Counter()

    # -- output -------------------------------------------------------------------

    def now(self):
        return time.monotonic() - self.t0

    def say(self, text):
        print("[%7.2f s] %s" % (self.now(), text), flush=True)

    def violation(self, kind, text, blame=None):
        """Record a broken promise; ``blame``: the kill it most likely follows from."""
        if blame is not None:
            blame.blamed[kind] += 1
        self.violations[kind].append(text)
        if len(self.violations[kind]) <= SHOWN:
            self.say("VIOLATION %s: %s" % (kind, text))

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

    def where(self, name):
        """The worker holding ``name``, as the log says: for reports."""
        k, title, pid = self.logins.worker_of.get(name, ("?", "chat-worker-?", 0))
        return "%s%s pid %d" % ("node%s " % k if self.redis else "", title[5:], pid)

    def live(self):
        return [u for u in self.active if u.state == "in" and u.probe_of is None]

    def up(self):
        return [k for k in range(len(self.nodes)) if k not in self.down]

    def pick_node(self, base):
        """User ``uK`` goes to node K mod n, or the next one up; a probe anywhere."""
        up = self.up()
        k = int(base[1:]) % len(self.nodes) if base[1:].isdigit() else self.rng.choice(up)
        return k if k in up else up[k % len(up)]

    def near_redis_restart(self, at, before, after):
        return any(k.role == "redis" and k.at - before <= at <= k.at + after
                   for k in self.kills)

    def may_be_lost(self, s, r, at):
        """A line between two nodes sent at ``at`` may have been lost with Redis."""
        return s.node != r.node and self.near_redis_restart(at, *IN_REDIS)

    def unavailable_ok(self):
        """Requests may be told ERR unavailable while Redis comes back, and
        for a lease after it came back empty (no new name then)."""
        return self.near_redis_restart(self.now(), 0.0, self.args.node_lease + 8.0)

    # -- the servers --------------------------------------------------------------

    def start(self):
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
        self.logins = Logins(self.nodes)

    def stop(self):
        for node in self.nodes:
            node.kill()
        if self.redis:
            self.redis.stop()

    def log(self):
        return "\n".join(("== node%d ==\n" % k if self.redis else "") + node.log()
                         for k, node in enumerate(self.nodes))

    # -- connections --------------------------------------------------------------

    def connect(self, name, base, gen, probe_of=None):
        u = User(name, base, gen, self.pick_node(base), self.now(), probe_of)
        self.users[name] = u
        try:
            sock = socket.create_connection(("127.0.0.1", self.nodes[u.node].port),
                                            timeout=IO_TIMEOUT)
        except OSError as exc:
            self.violation("connect", "%s could not connect: %s" % (name, exc))
            self.gone(u)
            return u
        sock.setblocking(False)
        u.sock = sock
        self.active.add(u)
        self.sel.register(sock, READ, u)
        u.login_deadline = time.monotonic() + LOGIN_TIMEOUT
        self.send(u, "LOGIN " + name)
        return u

    def send(self, u, line):
        self.tick += 1
        u.outbuf += line.encode() + b"\n"
        self.flush(u)

    def flush(self, u):
        try:
            sent = u.sock.send(u.outbuf)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self.lost(u, "send failed: %s" % exc)
            return
        u.outbuf = u.outbuf[sent:]
        self.sel.modify(u.sock, READ | (WRITE if u.outbuf else 0), u)

    def close(self, u):
        self.sel.unregister(u.sock)
        u.sock.close()
        u.sock = None
        self.active.discard(u)
        self.gone(u)

    def gone(self, u):
        self.tick += 1
        u.state = "gone"
        u.left_tick = self.tick
        u.left_at = self.now()

    def lost(self, u, why):
        """The server closed ``u``: fine if its worker or node was just killed;
        either way the user comes back under a new name."""
        was_in = u.state == "in"
        self.close(u)
        if u.probe_of is not None:
            return
        self.counts["connections lost"] += 1
        self.logins.read()
        where = self.logins.worker_of.get(u.name)
        culprits = [k for k in self.kills if k.role == "node" and k.node == u.node
                    and k.at >= u.connected_at]
        if not culprits and where is not None:
            culprits = [k for k in self.kills if k.pid == where[2]]
        elif not culprits:      # not logged in yet: which worker had it is not in the log
            culprits = [k for k in self.kills if k.role == "worker" and k.node == u.node
                        and u.left_at - k.at <= CUT_WINDOW]
        if culprits:
            # Its worker died at the kill, not when this loop saw the EOF:
            # the broker may have announced it in between.
            u.killed_by = culprits[-1]
            u.killed_by.cut.append(u.name)
            u.left_tick, u.left_at = u.killed_by.tick, u.killed_by.at
        else:
            self.violation("cut", "%s (%s, %s) lost its connection (%s) but neither its "
                           "worker nor its node was killed; %s"
                           % (u.name, "logged in" if was_in else "logging in",
                              self.where(u.name), why, self.kills_around(u.left_at)))
        self.reconnects.append((time.monotonic() + self.rng.uniform(0.2, 1.0), u.base, u.gen + 1))

    def on_ready(self, u, mask):
        if mask & WRITE:
            self.flush(u)
            if u.sock is None:
                return
        if not mask & READ:
            return
        try:
            data = u.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.lost(u, str(exc))
            return
        if not data:
            self.lost(u, "closed by the server")
            return
        *lines, u.inbuf = (u.inbuf + data).split(b"\n")
        for raw in lines:
            self.tick += 1
            self.on_line(u, raw.decode("utf-8", "replace"))
            if u.sock is None:
                return

    # -- what users receive -------------------------------------------------------

    def on_line(self, u, line):
        if u.probe_of is not None:
            self.on_probe_answer(u, line)
            return
        word, _, rest = line.partition(" ")
        if word in ("MSG", "DM") and u.state == "in":
            sender, _, text = rest.partition(" ")
            self.on_chat(u, word, sender, text)
        elif word == "INFO" and rest.endswith(" disconnected") and u.state == "in":
            self.on_info(u, rest[:-len(" disconnected")])
        elif line == "OK" and u.state == "login":
            u.state = "in"
            u.ok_tick = self.tick
            u.ok_at = self.now()
            u.next_action = time.monotonic() + self.rng.uniform(0, 1.0 / self.args.rate)
        elif word == "USER" and u.whos and u.whos[0][1] is not None:
            u.whos[0][1].append(rest)
        elif line == "PONG" and u.whos:
            self.check_who(u, *u.whos.popleft())
            u.barriers += 1
        elif line == "ERR user-not-found":
            self.counts["DM told user-not-found"] += 1   # its target had just left
        elif line == "ERR unavailable" and self.unavailable_ok():
            self.counts["requests told ERR unavailable"] += 1
            if u.state == "login":          # it tries again later, under a new name
                self.close(u)
                self.reconnects.append((time.monotonic() + 0.5, u.base, u.gen + 1))
            elif u.whos and not u.whos[0][1]:
                u.whos[0][1] = None         # that WHO has no answer to check
        else:
            self.violation("unexpected", "%s (%s) got %r" % (u.name, u.state, line))

    def on_chat(self, r, kind, sender, text):
        """Check one MSG/DM line against what its sender sent, and its stream so far."""
        self.counts[kind + " received"] += 1
        s = self.users.get(sender)
        prefix = "m" if kind == "MSG" else "d"
        sent = None
        if s is not None and text[:1] == prefix and text[1:].isdigit():
            sent = s.msgs if kind == "MSG" else s.dms.get(r.name, ())
            seq = int(text[1:])
        if not sent or not 1 <= seq <= len(sent) or (kind == "MSG" and s is r):
            self.violation("corrupt", "%s got %s %s %s, which was never sent to it"
                           % (r.name, kind, sender, text))
            return
        if r.infos[sender]:
            self.violation("order", "%s got %s %s %s after INFO %s disconnected"
                           % (r.name, kind, sender, text, sender))
        span = r.got.get((sender, kind))
        if span is None:
            r.got[(sender, kind)] = [seq, seq]
        elif seq <= span[1]:
            self.lines_hit["duplicate"].add((kind, sender, seq))
            before = [k for k in self.kills if k.at <= self.now()]
            self.violation("duplicate", "%s got %s %s #%d again or out of order (after #%d; "
                           "%s -> %s): %s" % (r.name, kind, sender, seq, span[1],
                                              self.where(sender), self.where(r.name),
                                              self.kills_around(self.now())),
                           before[-1] if before else None)
        else:
            if seq > span[1] + 1:
                self.report_loss(s, r, kind, span[1] + 1, seq - 1, "then #%d arrived" % seq)
            span[1] = seq

    def report_loss(self, s, r, kind, lo, hi, how):
        sent = s.msgs if kind == "MSG" else s.dms[r.name]
        lost = [n for n in range(lo, hi + 1) if not self.may_be_lost(s, r, sent[n - 1][1])]
        self.counts["lines lost with Redis"] += hi - lo + 1 - len(lost)
        if not lost:
            return
        lo, hi = lost[0], lost[-1]
        first_at, last_at = sent[lo - 1][1], sent[hi - 1][1]
        numbers = "#%d" % lo if lo == hi else "#%d-#%d" % (lo, hi)
        self.lines_hit["lost"].update((kind, s.name, n) for n in range(lo, hi + 1))
        after = [k for k in self.kills if k.at >= first_at] or self.kills[-1:]
        self.violation("lost", "%s %s->%s %s lost (%s -> %s; sent at %.2f-%.2f s, %s): %s"
                       % (kind, s.name, r.name, numbers, self.where(s.name), self.where(r.name),
                          first_at, last_at, how, self.kills_around(first_at)),
                       after[0] if after else None)
        self.counts["lines lost"] += hi - lo + 1

    def on_info(self, r, name):
        self.counts["INFO received"] += 1
        r.infos[name] += 1
        if r.infos[name] > 1:
            self.violation("info", "%s got INFO %s disconnected %d times"
                           % (r.name, name, r.infos[name]))
        else:
            r.info_tick[name] = self.tick
            r.info_at[name] = self.now()

    def check_who(self, r, sent_tick, names):
        if names is None:
            return
        self.counts["WHO answers checked"] += 1
        seen = Counter(n.lower() for n in names)
        twice = sorted(n for n, c in seen.items() if c > 1)
        if twice:
            self.violation("who", "%s's WHO lists %s more than once" % (r.name, ", ".join(twice)))
        if r.name not in names:
            self.violation("who", "%s's WHO leaves out %s itself" % (r.name, r.name))
        told = [n for n in names if r.info_tick.get(n, sent_tick) < sent_tick]
        if told:
            self.violation("who", "%s's WHO lists %s, announced as disconnected before"
                           % (r.name, ", ".join(told)))
        unknown = [n for n in names if n not in self.users]
        if unknown:
            self.violation("who", "%s's WHO lists unknown %s" % (r.name, ", ".join(unknown)))
        listed = set(names)
        missing = [u.name for u in self.users.values() if u.state == "in"
                   and u.ok_tick < sent_tick and u.name not in listed]
        if missing:
            self.who_missing.append((r.name, self.now(), missing))

    def ask_who(self, u):
        u.whos.append([self.tick + 1, []])
        self.send(u, "WHO")
        self.send(u, "PING")

    # -- load, probes, kills ------------------------------------------------------

    def act(self, u):
        """One random action of a logged-in user: a MSG, a DM or a WHO."""
        r = self.rng.random()
        if r < 0.5:
            u.msgs.append((self.tick + 1, self.now()))
            self.send(u, "MSG m%d" % len(u.msgs))
            self.counts["MSG sent"] += 1
        elif r < 0.9:
            others = [v for v in self.live() if v is not u]
            if others:
                target = self.rng.choice(others)
                sent = u.dms[target.name]
                sent.append((self.tick + 1, self.now()))
                self.send(u, "DM %s d%d" % (target.name, len(sent)))
                self.counts["DM sent"] += 1
        elif not u.whos:
            self.ask_who(u)
            self.counts["WHO sent"] += 1

    def probe(self):
        """A LOGIN of a name some live user holds, spelt in another case."""
        holders = self.live()
        if not holders:
            return
        holder = self.rng.choice(holders)
        for _ in range(10):
            name = "".join(self.rng.choice((c.lower(), c.upper())) for c in holder.name)
            if name not in self.users:
                self.counts["duplicate LOGINs tried"] += 1
                self.connect(name, name, 1, probe_of=holder)
                return

    def on_probe_answer(self, p, line):
        if line == "ERR username-taken":
            p.refused = True
            self.counts["duplicate LOGINs refused"] += 1
        elif line == "ERR unavailable" and self.unavailable_ok():
            self.counts["requests told ERR unavailable"] += 1
        elif line == "OK":
            p.ok_tick, p.ok_at = self.tick, self.now()
            self.counts["duplicate LOGINs granted"] += 1
            self.say("LOGIN %s got OK while %s holds the name (checked at the end)"
                     % (p.name, p.probe_of.name))
        else:
            self.violation("unexpected", "LOGIN %s got %r" % (p.name, line))
        self.close(p)

    def kill_one(self):
        """The next role's fault, if it can be done safely now."""
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
        self.tick += 1
        kill = Kill(len(self.kills) + 1, self.tick, self.now(), title, pid, node,
                    self.redis is not None)
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
        held = [n for n, where in self.logins.worker_of.items()
                if where[2] == pid and self.users[n].state != "gone"]
        self.say("kill #%d: SIGKILL %s%s (pid %d)%s" % (
            kill.number, title, " of node%d" % k if self.redis else "", pid,
            ", which holds %d users" % len(held) if role == "worker" else ""))
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
        if role == "redis":
            kill = self.record("redis", self.redis.proc.pid)
            self.redis.restart()
            kill.replaced_by, kill.replaced_in = self.redis.proc.pid, self.now() - kill.at
            self.say("kill #%d: restarted redis (pid %d), empty: pid %d after %.2f s"
                     % (kill.number, kill.pid, kill.replaced_by, kill.replaced_in))
            return True
        node = self.nodes[k]
        held = [u for u in self.active if u.node == k and u.state == "in"]
        kill = self.record("node", node.proc.pid, k)
        node.kill()
        self.down.add(k)
        self.restarts.append((mono + self.args.node_lease + 0.5, k))
        self.say("kill #%d: SIGKILL node%d's process group (pid %d), which holds %d users"
                 % (kill.number, k, kill.pid, len(held)))
        return True

    def restart_nodes(self, mono):
        """Start again the killed nodes whose time has come."""
        for when, k in [r for r in self.restarts if r[0] <= mono]:
            self.restarts.remove((when, k))
            self.relaunched[k] = len(self.nodes[k].log_lines)
            self.nodes[k].relaunch()

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
                k.replaced_by, k.replaced_in = fresh[0], self.now() - k.at
                self.say("%s replaced by pid %d after %.2f s" % (k, fresh[0], k.replaced_in))
            elif self.now() - k.at > REPLACE_TIMEOUT and k.node not in self.down:
                k.replaced_by = 0
                self.violation("replace", "%s: no successor within %.0f s" % (k, REPLACE_TIMEOUT))

    def watch_node(self, kill):
        """A killed node started again: listening, or refused because its
        id was still leased (then again later)."""
        node = self.nodes[kill.node]
        if kill.node not in self.relaunched:
            return
        if node.listening:
            self.down.discard(kill.node)
            del self.relaunched[kill.node]
            kill.replaced_by, kill.replaced_in = node.proc.pid, self.now() - kill.at
            self.say("%s: node%d listens again (pid %d) after %.2f s"
                     % (kill, kill.node, node.proc.pid, kill.replaced_in))
        elif node.proc.poll() is not None:
            lines = node.log_lines_from(self.relaunched.pop(kill.node))
            lease = lease_left(lines)
            if lease is None or self.now() - kill.at > self.args.node_lease + REPLACE_TIMEOUT:
                kill.replaced_by = 0
                self.violation("replace", "%s: the node did not start again: %s"
                               % (kill, lines[-1] if lines else "no log"))
            else:
                self.restarts.append((time.monotonic() + lease + 0.2, kill.node))

    # -- the loop -------------------------------------------------------------------

    def step(self):
        """One loop turn: I/O, then whatever timers are due in this phase."""
        for key, mask in self.sel.select(0.02):
            self.on_ready(key.data, mask)
        self.logins.read()
        mono = time.monotonic()
        if mono < self.next_timers:
            return
        self.next_timers = mono + 0.01
        for k in self.up():
            if self.nodes[k].proc.poll() is not None:
                raise RuntimeError("%s exited with status %s" % (
                    "node%d" % k if self.redis else "the server", self.nodes[k].proc.returncode))
        self.restart_nodes(mono)
        for u in list(self.active):
            if u.state == "login" and mono > u.login_deadline:
                self.violation("login", "LOGIN %s unanswered after %.0f s; %s"
                               % (u.name, LOGIN_TIMEOUT, self.kills_around(self.now())))
                self.lost(u, "login unanswered")
            elif u.state == "in" and self.phase == "load" and mono >= u.next_action \
                    and u.probe_of is None:
                u.next_action = mono + self.rng.uniform(0.5, 1.5) / self.args.rate
                self.act(u)
        due = [r for r in self.reconnects if r[0] <= mono]
        if due:
            self.reconnects = [r for r in self.reconnects if r[0] > mono]
            for _, base, gen in due:
                self.connect("%s-%d" % (base, gen), base, gen)
        if self.phase == "load":
            if mono >= self.next_kill:
                self.kill_one()
            if mono >= self.next_probe:
                self.next_probe = mono + self.args.probe_interval
                self.probe()
            if mono >= self.next_status:
                self.next_status = mono + STATUS_EVERY
                self.status()
        if mono >= self.next_watch:
            self.next_watch = mono + 0.05
            self.watch_replacements()

    def run_until(self, done, what):
        deadline = time.monotonic() + PHASE_TIMEOUT
        while not done():
            if time.monotonic() > deadline:
                self.violation("stuck", "%s not done within %.0f s" % (what, PHASE_TIMEOUT))
                return False
            self.step()
        return True

    def status(self):
        c = self.counts
        self.say("status: %d users logged in, %d kills, sent %d MSG %d DM, received %d MSG "
                 "%d DM %d INFO, %d connections lost"
                 % (len(self.live()), len(self.kills), c["MSG sent"], c["DM sent"],
                    c["MSG received"], c["DM received"], c["INFO received"],
                    c["connections lost"]))

    def run(self):
        args = self.args
        self.start()
        self.t0 = time.monotonic()
        self.say("%s listening on port %s (pid %s)%s; %d clients, seed %d" % (
            "%d nodes" % len(self.nodes) if self.redis else "server",
            ", ".join(str(n.port) for n in self.nodes),
            ", ".join(str(n.proc.pid) for n in self.nodes),
            ", redis on port %d" % self.redis.port if self.redis else "",
            args.clients, args.seed))
        for i in range(args.clients):
            self.connect("u%02d" % i, "u%02d" % i, 1)
        self.run_until(lambda: all(u.state != "login" for u in self.active), "first logins")
        self.phase = "load"
        start = time.monotonic()
        self.next_kill = start + args.interval
        self.next_probe = start + args.probe_interval / 2
        self.next_status = start + STATUS_EVERY
        while time.monotonic() - start < args.duration:
            self.step()
        self.phase = "settle"
        self.status()
        self.say("load stopped; waiting for replacements, reconnects and two barriers")
        self.run_until(lambda: all(k.replaced_by is not None for k in self.kills)
                       and not self.reconnects and time.monotonic() >= self.quiet_until
                       and all(u.state != "login" for u in self.active),
                       "settling")
        for n in (1, 2):
            # A PONG after a user's last line means the broker has it; a WHO
            # sent after every such PONG is answered after all of it was routed.
            goal = {u: u.barriers + len(u.whos) + 1 for u in self.live()}
            for u in goal:
                self.ask_who(u)
            self.run_until(lambda: all(u.barriers >= g or u.state != "in" for u, g in goal.items()),
                           "barrier %d" % n)
        if self.redis:
            # Between nodes a barrier proves nothing: what crosses goes through
            # Redis. Wait until what is due from every survivor has come.
            self.run_until(self.streams_complete, "delivery between nodes")
        self.check_streams()
        self.check_infos()
        self.check_names()
        self.check_final_session()
        self.check_processes()
        self.check_log()

    # -- the checks at the end ---------------------------------------------------

    def streams(self):
        """(sender, receiver, kind, what was sent, the numbers due) of every
        stream to a survivor: what a sender sent after the receiver's OK."""
        for r in self.live():
            for s in self.users.values():
                if s.probe_of is not None:
                    continue
                for kind, sent in (("MSG", s.msgs if s is not r else []),
                                   ("DM", s.dms.get(r.name, []))):
                    due = [i + 1 for i, (tick, _) in enumerate(sent) if tick > r.ok_tick]
                    if due:
                        yield s, r, kind, sent, due

    def streams_complete(self):
        """Has the last line due from every live sender come (but lines that
        may have been lost with Redis)?"""
        for s, r, kind, sent, due in self.streams():
            last = max((n for n in due if not self.may_be_lost(s, r, sent[n - 1][1])),
                       default=0)
            if s.state == "in" and r.got.get((s.name, kind), (0, 0))[1] < last:
                return False
        return True

    def check_streams(self):
        """Everything sent to a survivor after its OK arrived, but a dead sender's tail."""
        streams = tails = 0
        for s, r, kind, sent, due in self.streams():
            streams += 1
            first, last = r.got.get((s.name, kind), (None, None))
            if first is None:
                lo = due[0]
            elif first > due[0]:
                self.report_loss(s, r, kind, due[0], first - 1, "the stream began at #%d"
                                 % first)
                lo = last + 1
            else:
                lo = last + 1
            if lo <= due[-1]:
                if s.state == "in":
                    self.report_loss(s, r, kind, lo, due[-1], "never arrived")
                else:
                    tails += 1
        self.counts["streams checked"] = streams
        self.say("check: %d (sender, receiver, kind) streams to %d survivors; %d dead "
                 "senders' tails cut short (allowed)%s" % (
                     streams, len(self.live()), tails, "; %d lines lost with Redis (allowed)"
                     % self.counts["lines lost with Redis"] if self.redis else ""))

    def check_infos(self):
        """Exactly one INFO per departed user at each survivor logged in before it left."""
        checked, reaped = 0, []
        bound = self.args.node_lease + 2.0      # issue 12: a dead node's users, by then
        for r in self.live():
            for name, count in r.infos.items():
                u = self.users.get(name)
                if u is None or u.state != "gone":
                    self.violation("info", "%s got INFO %s disconnected, but %s"
                                   % (r.name, name, "no such user" if u is None
                                      else "it is still connected"))
                elif u.refused:
                    self.violation("info", "%s got INFO %s disconnected for a LOGIN that "
                                   "was refused" % (r.name, name))
            for u in self.users.values():
                if u.state == "gone" and u.ok_tick is not None and r.ok_tick < u.left_tick:
                    checked += 1
                    if not r.infos[u.name]:
                        self.violation("info", "%s never got INFO %s disconnected (%s left "
                                       "at %.2f s, %s)" % (r.name, u.name, u.name, u.left_at,
                                                           self.kills_around(u.left_at)),
                                       u.killed_by)
                    elif u.killed_by is not None and u.killed_by.role == "node":
                        reaped.append(r.info_at[u.name] - u.killed_by.at)
        if reaped and max(reaped) > bound + SLACK:
            self.violation("info", "a dead node's users were announced %.2f s after the kill "
                           "(the lease is %.1f s)" % (max(reaped), self.args.node_lease))
        self.say("check: %d departures x survivors announced exactly once%s" % (
            checked, "; a dead node's users within %.2f s (lease + 2 s: %.1f s)"
            % (max(reaped), bound) if reaped else ""))

    def check_names(self):
        """Names held by survivors were never granted twice, nor left out of WHO."""
        for p in self.users.values():
            if p.probe_of is not None and p.ok_tick is not None and p.probe_of.state == "in":
                self.violation("names", "LOGIN %s got OK at %.2f s while %s held the name "
                               "(and still does)" % (p.name, p.ok_at, p.probe_of.name))
        for asker, at, missing in self.who_missing:
            # A cut user may be gone from the broker a moment before its EOF;
            # after Redis restarted empty, the nodes have a lease to register
            # their users again.
            if self.near_redis_restart(at, 0.0, self.args.node_lease + 3.0):
                continue
            held = [n for n in missing if self.users[n].state == "in" or self.users[n].left_at
                    > at + (0.0 if self.users[n].killed_by else 1.0)]
            if held:
                self.violation("who", "%s's WHO at %.2f s left out %s, logged in before it"
                               % (asker, at, ", ".join(held)))
        c = self.counts
        self.say("check: %d WHO answers without duplicates; %d duplicate LOGINs, %d refused"
                 % (c["WHO answers checked"], c["duplicate LOGINs tried"],
                    c["duplicate LOGINs refused"]))

    def check_final_session(self):
        """Two new users: LOGIN, MSG, DM, WHO and PING all work after the chaos."""
        names = ("final-a", "final-b")
        try:
            a, b = [node.client(n) for node, n in zip((self.nodes[0], self.nodes[-1]), names)]
            try:
                a.send("MSG after the chaos")
                b.lines_until("MSG final-a after the chaos")
                b.send("DM final-a still here")
                a.lines_until("DM final-b still here")
                a.send("WHO", "PING")
                listed = a.lines_until("PONG")
                users = [line[5:] for line in listed if line.startswith("USER ")]
                want = sorted([u.name for u in self.live()] + list(names))
                if sorted(users) != want:
                    self.violation("final", "WHO after the chaos gave %s, not %s" % (users, want))
            finally:
                a.close()
                b.close()
        except (OSError, AssertionError) as exc:
            self.violation("final", "a new session failed: %s" % exc)
            return
        self.say("check: a new session works (LOGIN, MSG, DM, WHO, PING)")

    def check_processes(self):
        want = ["chat-broker", "chat-acceptor"] + ["chat-worker-%d" % k
                                                  for k in range(self.args.workers)]
        titles = [node.titles() for node in self.nodes]
        wrong = {"%s%s" % ("node%d " % n if self.redis else "", t): len(titles[n].get(t, ()))
                 for n in range(len(self.nodes)) for t in want if len(titles[n].get(t, ())) != 1}
        if wrong:
            self.violation("processes", "processes per role should be one each: %s" % wrong)
        alive = [k for k in self.kills if k.node is not None
                 and k.pid in [pid for pids in titles[k.node].values() for pid in pids]]
        if alive:
            self.violation("processes", "killed but still there: %s" % ", ".join(map(str, alive)))
        replaced = [k.replaced_in for k in self.kills if k.replaced_in is not None]
        self.say("check: one process per role (%s); %d kills, all replaced (slowest %.2f s)"
                 % (", ".join(want), len(self.kills), max(replaced, default=0.0))
                 if not wrong and len(replaced) == len(self.kills)
                 else "check: processes per role FAILED")

    def check_log(self):
        """Tracebacks are bugs; heartbeat kills are the supervisor's own."""
        lines = self.log().splitlines()
        tracebacks = sum(1 for line in lines if line.startswith("Traceback"))
        if tracebacks:
            self.violation("log", "the server logged %d tracebacks (see --server-log)" % tracebacks)
        hung = [line for line in lines if "missed its heartbeats" in line]
        for line in hung:
            self.say("note: the supervisor killed a hung process: %s" % line)

    def summary(self):
        c = self.counts
        by_role = Counter(k.role for k in self.kills)
        print("\n== chaos summary ==")
        print("seed %d, %.0f s of load, %s%d workers, %d clients, kill interval %.1f s"
              % (self.args.seed, self.args.duration, "%d nodes of " % len(self.nodes)
                 if self.redis else "", self.args.workers, self.args.clients,
                 self.args.interval))
        print("kills: %d (%s)" % (len(self.kills), ", ".join(
            "%s %d" % (role, by_role[role]) for role in (CLUSTER_ROLES if self.redis
                                                          else ROLES))))
        for k in self.kills:
            print("  %s: replaced in %s%s%s" % (
                k, "%.2f s" % k.replaced_in if k.replaced_in is not None else "NEVER",
                ", %d connections lost with it" % len(k.cut) if k.role in ("worker", "node")
                else "", "".join("; %d %s violations" % (n, kind)
                                 for kind, n in sorted(k.blamed.items()))))
        print("sent: %d MSG, %d DM, %d WHO; received: %d MSG, %d DM, %d INFO"
              % (c["MSG sent"], c["DM sent"], c["WHO sent"], c["MSG received"],
                 c["DM received"], c["INFO received"]))
        print("connections lost: %d (all to worker or node kills unless a 'cut' violation "
              "says otherwise); DMs told user-not-found: %d"
              % (c["connections lost"], c["DM told user-not-found"]))
        print("duplicate LOGINs: %d tried, %d refused, %d granted"
              % (c["duplicate LOGINs tried"], c["duplicate LOGINs refused"],
                 c["duplicate LOGINs granted"]))
        if self.redis:
            print("across nodes: %d lines lost with Redis, %d requests told ERR unavailable "
                  "(both allowed around a Redis restart)"
                  % (c["lines lost with Redis"], c["requests told ERR unavailable"]))
        if not self.violations:
            print("RESULT: PASS")
            return 0
        print("RESULT: FAIL, %d violations: %s" % (
            sum(map(len, self.violations.values())),
            ", ".join("%s %d%s" % (k, len(v), " (%d distinct lines sent)" % len(self.lines_hit[k])
                                   if k in self.lines_hit else "")
                      for k, v in sorted(self.violations.items()))))
        for kind, texts in sorted(self.violations.items()):
            for text in texts[:SHOWN]:
                print("  %s: %s" % (kind, text))
            if len(texts) > SHOWN:
                print("  %s: ... and %d more" % (kind, len(texts) - SHOWN))
        return 1


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
        chaos.violation("server", str(exc))
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
