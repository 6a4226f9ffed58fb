"""What a node sends Redis, in order, and sends again until it is answered.

* **One entry per turn.** A broker turn's lines for other nodes (the records
  of :mod:`chatlib.cluster.bus`), its departures and its claims travel as
  one PUBLISH; the turn's requests (``LOGIN``, ``WHO``, a ``DM``) follow it
  in the same write, and never overtake it.
* **One entry in flight.** While Redis has not answered the last, the turns
  that follow gather into the next, up to ENTRY_BYTES: under load a command
  carries many turns' lines; a lone message finds nothing in flight and
  goes at once.
* **Nothing lost, nothing twice.** A command whose reply never came (the
  connection died) is sent again after reconnecting, first, in its order;
  the scripts are idempotent. A worker's batches may be acknowledged once
  Redis confirmed the entry that carries them (``confirmed``).
* **Fenced by the lease.** Each script is sent with ``P node lease`` of the
  moment (``fencing_args``), so a command sent again carries the new lease.
  When the node gives its users up, their lines not yet in Redis go, those
  in flight too if they must be sent again; their departures stay.
"""

from collections import deque
from functools import partial

from chatlib.cluster import bus, registry
from chatlib.cluster.resp import ConnectionLost, RedisError

ENTRY_BYTES = 1 << 20     # an entry gathering while another is in flight goes past this


class Op:
    """One command for Redis that must be sent, and sent again after a
    reconnect until its reply comes: ``script`` run with ``args`` (after
    ``P node lease``), or the plain command ``args`` if ``script`` is None;
    ``on_reply`` takes the reply."""

    def __init__(self, script, args, on_reply, size=0):
        self.script = script
        self.args = args
        self.on_reply = on_reply
        self.size = size

    def arguments(self):
        return self.args


class _Publish(Op):
    """A PUBLISH: one bus entry with a turn's records (``data``), the
    departures to release (key, owner, announce) and the claims to list."""

    def __init__(self, data, releases, joins, on_reply, users_era):
        super().__init__(registry.PUBLISH, None, on_reply, len(data))
        self.users_era = users_era    # the node's users when it was made (see drop_lines)
        self.data = data
        self.releases = releases
        self.joins = joins

    def drop_lines(self):
        """Only the departures still go: the users whose lines these were are closed."""
        self.data = b""
        self.joins = []
        self.size = 0

    def arguments(self):
        args = [registry.STREAM_MAXLEN, self.data, len(self.releases)]
        for key, owner, announce in self.releases:
            args += [key, owner, "1" if announce else "0"]
        for key, owner in self.joins:
            args += [key, owner]
        return args


class Publisher:
    def __init__(self, commands, log, fencing_args):
        self.commands = commands       # the node's RedisClient for commands
        self.log = log
        self.fencing_args = fencing_args   # () -> [P, node, lease value] of the moment
        self.records = bus.Records()   # this turn's lines for other nodes
        self.releases = []         # this turn's (key, owner, announce)
        self.joins = []            # this turn's (key, owner) claimed
        self.requests = []         # this turn's requests, sent after its entry
        self.covered = None        # the batches the entry being gathered covers
        self.gathered = []         # requests waiting behind that entry
        self.publishing = 0        # entries sent, unanswered
        self.backlog = deque()     # ops not sent yet, in order
        self.lost = []             # ops sent whose connection died unanswered, in order
        self.backlog_bytes = 0
        self.later = []            # (when, op) claims to send again
        self.unconfirmed = deque()  # per entry in flight: the batches it covers
        self.confirmed = {}        # slot -> last batch whose lines Redis holds:
                                   # its batches up to there may be acknowledged
        self.entries_out = 0       # bus entries Redis confirmed, since start
        self.users_era = 0         # times the node gave up all its users

    # -- what the node hands over ---------------------------------------------

    def broadcast(self, slot, number, blob):
        self.records.from_batch(slot, number)
        self.records.broadcast(blob)

    def dm(self, slot, number, key, line):
        self.records.from_batch(slot, number)
        self.records.dm(key, line)

    def release(self, key, owner, announce):
        self.releases.append((key, owner, announce))

    def claimed(self, key, owner):
        """A name just granted: listed in the next entry, for directories."""
        self.joins.append((key, owner))

    def request(self, op):
        """Sent after this turn's entry."""
        self.requests.append(op)

    def retry(self, op, when):
        self.later.append((when, op))

    def next_retry(self):
        return min((when for when, _ in self.later), default=None)

    def retries_due(self, now):
        if self.later and min(when for when, _ in self.later) <= now:
            due = [op for when, op in self.later if when <= now]
            self.later = [(when, op) for when, op in self.later if when > now]
            self.queue(*due)

    def waiting_bytes(self):
        return self.backlog_bytes + self.commands.buffered_bytes

    # -- turns, entries, sending ----------------------------------------------

    def end_turn(self, received, leaving):
        """What the turn has for Redis: one bus entry, then the requests;
        False while they gather behind the entry in flight."""
        if self.records or self.releases or self.joins or self.covered is not None:
            self.covered = dict(received)
        elif not self.unconfirmed:
            self.confirmed = dict(received)
        if self.publishing and (self.covered is not None or self.gathered) \
                and self.records.size < ENTRY_BYTES and not leaving:
            self.gathered.extend(self.requests)
            self.requests = []
            return False
        if self.covered is not None:
            covered, self.covered = self.covered, None
            self.unconfirmed.append(covered)
            self.queue(_Publish(self.records.encode(), self.releases, self.joins,
                                partial(self.on_published, covered), self.users_era))
            self.records = bus.Records()
            self.releases = []
            self.joins = []
        if self.gathered or self.requests:
            self.queue(*self.gathered, *self.requests)
            self.gathered = []
            self.requests = []
        return True

    def queue(self, *ops):
        for op in ops:
            self.backlog.append(op)
            self.backlog_bytes += op.size

    def send(self, hold_claims):
        """Send what waits, in order; with ``hold_claims`` (a fenced node
        gives no names until its lease is renewed) the claims wait."""
        if not self.backlog:
            return
        held = deque()
        while self.backlog:
            op = self.backlog.popleft()
            if hold_claims and op.script is registry.CLAIM:
                held.append(op)
                continue
            self.backlog_bytes -= op.size
            if op.script is registry.PUBLISH:
                self.publishing += 1
            callback = partial(self.on_reply, op)
            if op.script is None:
                self.commands.call(callback, *op.arguments())
            else:
                self.commands.evalsha(callback, op.script, (),
                                      self.fencing_args() + list(op.arguments()))
        self.backlog = held
        self.commands.flush()

    def on_reply(self, op, reply):
        if op.script is registry.PUBLISH:
            self.publishing -= 1
        if isinstance(reply, ConnectionLost):
            if isinstance(op, _Publish) and op.users_era != self.users_era:
                op.drop_lines()                 # its users were given up meanwhile
            self.lost.append(op)
            return
        if isinstance(reply, RedisError):
            self.log.error("redis refused a cluster command: %s", reply)
        op.on_reply(reply)

    def on_published(self, covered, reply):
        self.entries_out += 1
        if reply == b"lapsed":
            self.log.error("redis refused this node's lines: its lease had run out")
        if self.unconfirmed and self.unconfirmed[0] is covered:
            self.unconfirmed.popleft()
        self.confirmed = covered

    def resend_lost(self):
        """The connection died: what it left unanswered goes again first."""
        self.backlog.extendleft(reversed(self.lost))
        self.lost = []

    def drop_lines(self):
        """The node gave its users up: what they said that Redis has not got
        goes (in flight too, if it must be sent again); departures stay."""
        self.users_era += 1
        for op in self.backlog:
            if isinstance(op, _Publish):
                self.backlog_bytes -= op.size
                op.drop_lines()
        self.records = bus.Records()
        self.joins = []
