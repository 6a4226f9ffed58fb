"""The users of a chaos run: one selectors loop over their connections,
the chat they make (numbered MSG and DM lines, WHO, now and then a LOGIN
of a name somebody holds), and a new name for a user whose connection
died. What each line means for the promises is the oracle's to say."""

import selectors
import socket
import time
from collections import Counter, defaultdict, deque

from ..harness import IO_TIMEOUT

READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
LOGIN_TIMEOUT = 20.0    # a LOGIN must be answered by then, broker restart or not


class User:
    """One name, and the one connection that holds (or claims) it."""

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


class Clients:
    """Every user ever connected, and the loop over those connected now.

    ``oracle`` judges what arrives; ``faults`` says which nodes are up and
    which kill explains a lost connection. Both are set before the first
    connection.
    """

    def __init__(self, args, rng, journal, nodes, logins):
        self.args = args
        self.rng = rng
        self.journal = journal
        self.nodes = nodes
        self.logins = logins
        self.oracle = None
        self.faults = None
        self.sel = selectors.DefaultSelector()
        self.users = {}             # every name ever used -> User
        self.active = set()         # the Users with a connection
        self.reconnects = []        # (when, base, gen)

    def live(self):
        return [u for u in self.active if u.state == "in" and u.probe_of is None]

    def held(self, node, pid=None):
        """Users logged in on ``node``, or on its worker ``pid``."""
        if pid is None:
            return sum(1 for u in self.active if u.node == node and u.state == "in")
        return sum(1 for n, where in self.logins.worker_of.items()
                   if where[2] == pid and self.users[n].state != "gone")

    def pick_node(self, base):
        """User ``uK`` goes to node K mod n, or the next one up; a probe anywhere."""
        up = self.faults.up()
        k = int(base[1:]) % len(self.nodes) if base[1:].isdigit() else self.rng.choice(up)
        return k if k in up else up[k % len(up)]

    # -- connections --------------------------------------------------------------

    def connect(self, name, base, gen, probe_of=None):
        u = User(name, base, gen, self.pick_node(base), self.journal.now(), probe_of)
        self.users[name] = u
        try:
            sock = socket.create_connection(("127.0.0.1", self.nodes[u.node].port),
                                            timeout=IO_TIMEOUT)
        except OSError as exc:
            self.journal.violation("connect", "%s could not connect: %s" % (name, exc))
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
        self.journal.next_tick()
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
        u.state = "gone"
        u.left_tick = self.journal.next_tick()
        u.left_at = self.journal.now()

    def reconnect_later(self, u, delay):
        """``u``'s user comes back under its next name (``u07-2``)."""
        self.reconnects.append((time.monotonic() + delay, u.base, u.gen + 1))

    def lost(self, u, why):
        """The server closed ``u``: fine if its worker or node was just killed;
        either way the user comes back under a new name."""
        was_in = u.state == "in"
        self.close(u)
        if u.probe_of is not None:
            return
        self.journal.counts["connections lost"] += 1
        culprit = self.faults.culprit(u)
        if culprit is not None:
            # Its worker died at the kill, not when this loop saw the EOF:
            # the broker may have announced it in between.
            u.killed_by = culprit
            culprit.cut.append(u.name)
            u.left_tick, u.left_at = culprit.tick, culprit.at
        else:
            self.journal.violation(
                "cut", "%s (%s, %s) lost its connection (%s) but neither its worker nor its "
                "node was killed; %s" % (u.name, "logged in" if was_in else "logging in",
                                         self.logins.where(u.name), why,
                                         self.faults.kills_around(u.left_at)))
        self.reconnect_later(u, self.rng.uniform(0.2, 1.0))

    def poll(self, timeout):
        """One round of I/O."""
        for key, mask in self.sel.select(timeout):
            self.on_ready(key.data, mask)

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
            self.journal.next_tick()
            self.on_line(u, raw.decode("utf-8", "replace"))
            if u.sock is None:
                return

    # -- what users receive -------------------------------------------------------

    def on_line(self, u, line):
        """One line for ``u``: its own protocol state here, the rest judged
        by the oracle."""
        journal, oracle = self.journal, self.oracle
        if u.probe_of is not None:
            self.on_probe_answer(u, line)
            return
        word, _, rest = line.partition(" ")
        if word in ("MSG", "DM") and u.state == "in":
            sender, _, text = rest.partition(" ")
            oracle.on_chat(u, word, sender, text)
        elif word == "INFO" and rest.endswith(" disconnected") and u.state == "in":
            oracle.on_info(u, rest[:-len(" disconnected")])
        elif line == "OK" and u.state == "login":
            u.state = "in"
            u.ok_tick = journal.tick
            u.ok_at = journal.now()
            u.next_action = time.monotonic() + self.rng.uniform(0, 1.0 / self.args.rate)
        elif word == "USER" and u.whos and u.whos[0][1] is not None:
            u.whos[0][1].append(rest)
        elif line == "PONG" and u.whos:
            oracle.check_who(u, *u.whos.popleft())
            u.barriers += 1
        elif line == "ERR user-not-found":
            journal.counts["DM told user-not-found"] += 1   # its target had just left
        elif line == "ERR unavailable" and self.faults.unavailable_ok():
            journal.counts["requests told ERR unavailable"] += 1
            if u.state == "login":          # it tries again later, under a new name
                self.close(u)
                self.reconnect_later(u, 0.5)
            elif u.whos and not u.whos[0][1]:
                u.whos[0][1] = None         # that WHO has no answer to check
        else:
            journal.violation("unexpected", "%s (%s) got %r" % (u.name, u.state, line))

    def on_probe_answer(self, p, line):
        counts = self.journal.counts
        if line == "ERR username-taken":
            p.refused = True
            counts["duplicate LOGINs refused"] += 1
        elif line == "ERR unavailable" and self.faults.unavailable_ok():
            counts["requests told ERR unavailable"] += 1
        elif line == "OK":
            p.ok_tick, p.ok_at = self.journal.tick, self.journal.now()
            counts["duplicate LOGINs granted"] += 1
            self.journal.say("LOGIN %s got OK while %s holds the name (checked at the end)"
                             % (p.name, p.probe_of.name))
        else:
            self.journal.violation("unexpected", "LOGIN %s got %r" % (p.name, line))
        self.close(p)

    # -- the load -----------------------------------------------------------------

    def ask_who(self, u):
        u.whos.append([self.journal.tick + 1, []])
        self.send(u, "WHO")
        self.send(u, "PING")

    def act(self, u):
        """One random action of a logged-in user: a MSG, a DM or a WHO."""
        r = self.rng.random()
        journal = self.journal
        if r < 0.5:
            u.msgs.append((journal.tick + 1, journal.now()))
            self.send(u, "MSG m%d" % len(u.msgs))
            journal.counts["MSG sent"] += 1
        elif r < 0.9:
            others = [v for v in self.live() if v is not u]
            if others:
                target = self.rng.choice(others)
                sent = u.dms[target.name]
                sent.append((journal.tick + 1, journal.now()))
                self.send(u, "DM %s d%d" % (target.name, len(sent)))
                journal.counts["DM sent"] += 1
        elif not u.whos:
            self.ask_who(u)
            journal.counts["WHO sent"] += 1

    def probe(self):
        """A LOGIN of a name some live user holds, spelt in another case."""
        holders = self.live()
        if not holders:
            return
        holder = self.rng.choice(holders)
        for _ in range(10):
            name = "".join(self.rng.choice((c.lower(), c.upper())) for c in holder.name)
            if name not in self.users:
                self.journal.counts["duplicate LOGINs tried"] += 1
                self.connect(name, name, 1, probe_of=holder)
                return

    def timers(self, mono, loading):
        """Unanswered LOGINs, users' next actions (while ``loading``), and
        reconnections due."""
        for u in list(self.active):
            if u.state == "login" and mono > u.login_deadline:
                self.journal.violation("login", "LOGIN %s unanswered after %.0f s; %s"
                                       % (u.name, LOGIN_TIMEOUT,
                                          self.faults.kills_around(self.journal.now())))
                self.lost(u, "login unanswered")
            elif u.state == "in" and loading and mono >= u.next_action \
                    and u.probe_of is None:
                u.next_action = mono + self.rng.uniform(0.5, 1.5) / self.args.rate
                self.act(u)
        due = [r for r in self.reconnects if r[0] <= mono]
        if due:
            self.reconnects = [r for r in self.reconnects if r[0] > mono]
            for _, base, gen in due:
                self.connect("%s-%d" % (base, gen), base, gen)

    def logging_in(self):
        return any(u.state == "login" for u in self.active)
