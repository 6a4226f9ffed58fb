"""Cluster mode: one node's side of a chat shared through Redis.

The broker keeps routing between its own workers exactly as on one host; a
:class:`Cluster` beside it is its directory (:mod:`chatlib.directory`): it
carries what other nodes must see, and brings back what they send. Two
connections to Redis (:mod:`chatlib.cluster.redis_client`): one for
commands, pipelined, and one blocked reading the bus stream. Its parts:
the publisher (what goes to Redis, batched, in order, sent again after a
reconnect: :mod:`chatlib.cluster.publisher`), the bus reader
(:mod:`chatlib.cluster.reader`), the lease (:mod:`chatlib.cluster.lease`)
and the clients waiting for answers (:mod:`chatlib.cluster.requests`).
Here: joining, renewing and fencing, and what each request does.

What it keeps true, and how:

* **One name space, atomic LOGIN, linearizable WHO.** Names are claimed and
  released by Lua scripts (:mod:`chatlib.cluster.registry`); ``WHO`` reads
  Redis. Commands go out on one connection in the order they were made, so
  a release queued before a ``WHO`` is done before it.
* **Leases.** A node renews its lease every HEARTBEAT seconds and reaps the
  nodes whose lease ran out (announcing their users gone). A node that could
  not renew closes its users' connections with ``ERR unavailable`` before
  its lease can run out, so that nobody is announced gone on one side and
  still chatting on the other; what it had not yet passed to Redis is
  dropped, except the departures. Its workers run its users' lines only
  until then (the broker tells them how long the lease holds), so a node
  that was frozen serves them nothing when it wakes.
* **Fencing.** However late a stale node's commands reach Redis, they carry
  the lease value its last JOIN set, and the scripts refuse them once that
  lease is gone (:mod:`chatlib.cluster.registry`). A JOIN carries the node's users,
  checked against the registry in the same script: a node whose lease
  lapsed gets none of them back and closes them all.
* **Redis restarted, or failed over.** On every connection the node asks
  Redis who it is (``run_id``, ``master_replid``): a server it has not
  written to may have missed its last writes (replication is asynchronous),
  as an empty one has lost them all (its epoch is gone). Either way the node
  registers its users again, and no new name is given for one lease, until
  every live node has had the time to do the same.
"""

import os
import time
from functools import partial

from chatlib import accounts, moderation, protocol
from chatlib.cluster import bus, registry
from chatlib.cluster.lease import Lease
from chatlib.cluster.publisher import Op, Publisher
from chatlib.cluster.reader import BusReader
from chatlib.cluster.redis_client import RedisClient
from chatlib.cluster.requests import Requests
from chatlib.cluster.resp import ConnectionLost, RedisError
from chatlib.control.users import UserRow

RETRY_DELAY = 0.25        # a claim refused for now (recovering) tries again after this
BACKLOG_LIMIT = 64 << 20  # bytes waiting for Redis above which the broker stops reading
LEAVE_TIMEOUT = 1.5       # seconds a stopping node waits for its departures to be published
IDENTITY_FIELDS = (b"run_id", b"master_replid")   # a Redis server, and its data's history


class Cluster:
    ready_at_start = False     # serving once joined (the supervisor waits)
    routes_at_once = False     # a restarted broker's users are checked by the first JOIN

    def __init__(self, cfg, sel, log, router):
        self.router = router       # the broker, as a chatlib.directory.Router
        self.log = log
        self.prefix = cfg.cluster
        self.node = cfg.node_id
        self.node_b = cfg.node_id.encode()
        self.token = cfg.node_token  # this run's: the first part of each lease value
        self.lease = Lease(cfg.node_lease, time.monotonic())
        self.commands = RedisClient(cfg.redis, sel, "redis", on_up=self.on_up,
                                    on_down=self.on_down, scripts=registry.SCRIPTS,
                                    log=self.log)
        self.reader = BusReader(cfg.redis, sel, log, self.prefix, self.node, router)
        self.epoch = ""            # the registry's epoch, once joined
        self.identity = None       # IDENTITY_FIELDS of the Redis we last wrote to
        self.join_mode = None      # '' or 'lost' once Redis is identified; None before
        self.joining = False       # a JOIN is in flight
        self.registered = False    # joined on the current connection
        self.ready = False         # told the supervisor once
        self.cursor_saved = None   # the bus cursor the next heartbeat saves in Redis
        self.publisher = Publisher(self.commands, log, self.fencing_args)
        self.pending = Requests()  # clients waiting for Redis's answer
        self.dm_number = time.time_ns()
        self.leaving = None        # (deadline, callback) while stopping
        self.duplicate_seen = False  # our id was leased by another run at start
        self.rejoin_at = None      # when to look again
        self.leave_queued = False
        self.live_nodes = 0        # as the last heartbeat counted them

    # -- life -----------------------------------------------------------------

    def start(self):
        self.commands.start()

    def figures(self):
        """For the statistics line."""
        state = "fenced" if self.lease.fenced else "up" if self.registered and self.commands.up \
            else "down"
        return {"redis": state, "other_users": len(self.reader.mirror), "nodes": self.live_nodes,
                "entries_out": self.publisher.entries_out,
                "entries_in": self.reader.entries_in,
                "backlog": self.publisher.waiting_bytes()}

    def owner(self, slot, cid):
        return "%s %d %d" % (self.node, slot, cid)

    @property
    def congested(self):
        return self.publisher.waiting_bytes() > BACKLOG_LIMIT

    def note_cursor(self, cursor):
        self.reader.note_cursor(cursor)

    def next_wakeup(self):
        times = [self.lease.next_renewal if self.registered else None,
                 self.pending.next_deadline(),
                 self.publisher.next_retry(),
                 self.lease.vouched_until if self.router.local_users() and not self.lease.fenced
                 else None,
                 self.rejoin_at, self.commands.next_wakeup(), self.reader.next_wakeup()]
        return min([t for t in times if t is not None], default=None)

    def tick(self, now):
        self.commands.tick(now)
        self.reader.tick(now)
        for request in self.pending.expired(now):
            self.router.answer(request.slot, request.cid, protocol.ERR_UNAVAILABLE)
        self.publisher.retries_due(now)
        self.check_lease(now)
        if self.registered and self.lease.renewal_due(now):
            self.heartbeat(now)
        if self.leaving and now >= self.leaving[0]:
            self.left(None)
        if self.rejoin_at is not None and now >= self.rejoin_at:
            self.rejoin_at = None
            self.synced()
        self.send()
        self.commands.flush()

    # -- the command connection ------------------------------------------------

    def on_up(self):
        """Connected: register (again) before anything else goes, once we
        know which Redis this is. The bus reader starts once Redis first
        answered, so that a Redis unreachable at start is logged once, not
        once per connection."""
        self.reader.start()
        self.registered = self.joining = False
        self.join_mode = None
        answers = []
        for section in ("server", "replication"):
            self.commands.call(partial(self.on_info, answers), "INFO", section)
        self.commands.flush()

    def on_info(self, answers, reply):
        """Both INFO replies in: is this the Redis we wrote to? A restart and
        a promotion of a replica both change its run id or replication id."""
        answers.append(reply)
        if len(answers) < 2 or any(isinstance(a, ConnectionLost) for a in answers):
            return
        refused = [a for a in answers if isinstance(a, RedisError)]
        identity = None if refused else _info_fields(b"\r\n".join(answers), IDENTITY_FIELDS)
        if refused and not self.epoch:
            self.log.warning("redis refused INFO (%s): a failover to a replica that missed "
                             "writes would go unnoticed", refused[0])
        self.join_mode = ""
        if identity and self.identity and identity != self.identity:
            self.log.warning("redis is not the server this node wrote to (restarted, or "
                             "failed over to a replica?): it may have missed the last "
                             "writes; registering this node's %d users again, and no new "
                             "names for %.0f s", len(self.router.local_users()),
                             self.lease.seconds)
            self.join_mode = "lost"
        self.identity = identity or self.identity
        self.synced()

    def synced(self):
        """JOIN once Redis is identified and every worker has told the broker
        who is logged in there (the broker calls this once they all have):
        the JOIN checks those users."""
        if self.join_mode is not None and self.commands.up and not self.joining \
                and not self.registered and self.router.all_synced() and self.rejoin_at is None:
            self.join(self.join_mode)

    def join(self, mode):
        lease_value = "%s.%s" % (self.token, os.urandom(6).hex())
        args = [self.prefix, self.node, lease_value, self.lease.ms, registry.STREAM_MAXLEN,
                os.urandom(8).hex(), self.epoch, mode, "0" if self.epoch else "1"]
        for name, slot, cid, stamp in self.router.local_users().values():
            args += [name.lower(), self.owner(slot, cid), name, stamp]
        self.joining = True
        self.commands.evalsha(partial(self.on_join, time.monotonic(), lease_value, mode),
                              registry.JOIN, (), args)
        self.commands.flush()

    def on_join(self, sent, lease_value, mode, reply):
        self.joining = False
        if isinstance(reply, (ConnectionLost, RedisError)):
            if isinstance(reply, RedisError):
                self.log.error("cannot join the cluster: %s", reply)
            return                              # on_up joins again
        status = reply[0]
        if status == b"duplicate":
            self.duplicate(max(0, reply[1]) / 1000)
            return
        if status == b"epoch":
            if self.join_mode != "lost":
                self.log.warning("redis has lost the cluster's data (restarted empty?): "
                                 "registering this node's %d users again",
                                 len(self.router.local_users()))
            self.join("restore")
            return
        _, epoch, last_id, keys, conflicts, lapsed, moderated, registered = reply
        if not self.epoch:
            self.log.info("joined cluster %r as node %s", self.prefix, self.node)
        self.epoch = epoch.decode()
        self.lease.value = lease_value
        self.join_mode = ""
        self.registered = True
        if lapsed and self.router.local_users() and not self.lease.fenced:
            self.log.error("this node's cluster lease had run out (was it stopped, or cut "
                           "off?): closing its %d users' connections (ERR unavailable)",
                           len(self.router.local_users()))
            self.give_up_users()
        elif conflicts:
            self.router.evict([k.decode() for k in conflicts])
        self.renewed(sent)
        self.restore_state(moderated, registered, mode == "restore")
        self.reader.mirror = {k.decode() for k in keys} - set(self.router.local_users())
        self.router.directory_changed()
        self.serve(last_id)
        self.send()

    def restore_state(self, moderated, registered, lost):
        """The bans and mutes, and the accounts, as Redis holds them; if
        Redis had ``lost`` them, ours go back (and to the other nodes)."""
        for kind, values, module in (("moderation", moderated, moderation),
                                     ("account", registered, accounts)):
            ops = []
            for value in values:
                try:
                    ops.append(module.decode_op(value))
                except ValueError as exc:
                    self.log.error("skipping a malformed %s record in redis: %s", kind, exc)
            back = self.router.restore_state(kind, ops, lost)
            if back:
                self.log.info("giving redis back this node's %d %s records", len(back), kind)
                self.control([(kind, op) for op in back])

    def serve(self, join_cursor):
        """Registered, so every worker had synced (a restarted broker has
        their cursors): start reading, and serving."""
        self.reader.resume(join_cursor)
        self.router.joined()
        if not self.ready:
            self.ready = True
            self.router.report_ready()

    def duplicate(self, left):
        """Our id is leased by another run: a live node (its lease stays
        renewed), or the run before this one, dead (it runs out). Wait once
        for it to run out; if it is still held, the node is a duplicate."""
        if self.rejoin_at is None and not self.epoch and not self.duplicate_seen:
            self.duplicate_seen = True
            self.rejoin_at = time.monotonic() + left + 0.25
            self.log.warning("node id %r is leased by another run (for %.1f s more): "
                             "waiting to see whether it is alive", self.node, left)
            return
        self.router.fatal(
            "node id %r is in use by another live node of cluster %r: give each "
            "node its own --node-id" % (self.node, self.prefix))

    def on_down(self):
        """Every unanswered command failed (in order): send them again later,
        first, after registering again."""
        self.registered = self.joining = False
        self.join_mode = None
        self.lease.renewal_sent = None
        self.publisher.resend_lost()

    def renewed(self, sent):
        """Redis renewed the lease at ``sent`` or later. The workers run our
        users' lines until we would fence."""
        if self.lease.renewed(sent, time.monotonic()):
            self.log.info("cluster lease renewed: serving logins again")
        if not self.lease.fenced:
            self.router.vouch(self.lease.vouched_until)

    def heartbeat(self, now):
        """Renew the lease; save the cursor of one heartbeat ago, whose lines
        are surely with the workers, for a broker that replaces this one."""
        self.lease.renewal_sent = now
        saved, self.cursor_saved = self.cursor_saved, self.reader.cursor
        self.commands.evalsha(self.on_heartbeat, registry.HEARTBEAT, (),
                              [self.prefix, self.node, self.lease.value, self.lease.ms,
                               self.epoch, registry.STREAM_MAXLEN, self.lease.ms * 3,
                               saved or ""])

    def on_heartbeat(self, reply):
        sent, self.lease.renewal_sent = self.lease.renewal_sent, None
        if isinstance(reply, (ConnectionLost, RedisError)) or sent is None:
            if isinstance(reply, RedisError):
                self.log.error("cluster heartbeat failed: %s", reply)
                self.lease.next_renewal = time.monotonic() + self.lease.renew_every
            return
        status = reply[0]
        if status == b"ok":
            self.renewed(sent)
            pairs, self.live_nodes = reply[1], reply[2]
            for node, count in zip(pairs[::2], pairs[1::2]):
                self.log.warning("node %s missed its lease: %d users announced gone",
                                 node.decode(), count)
            return
        if status != b"epoch" and not self.lease.fenced:     # lapsed: gone, or taken for dead
            self.log.error("this node's cluster lease ran out before it was renewed "
                           "(was it stopped, or cut off?); joining again")
            self.fence()
        self.registered = False
        self.synced()

    def check_lease(self, now=None):
        """Fence if the lease may run out before Redis hears from us. The
        broker asks before it routes anything, so that a node that was not
        running (stopped, paused) closes its users before serving a line."""
        now = time.monotonic() if now is None else now
        if self.router.local_users() and self.lease.must_fence(now):
            self.fence()

    def fence(self):
        """Our lease may run out before Redis hears from us: no names given
        until it is renewed, and our users given up (the others will
        announce them)."""
        self.lease.fenced = True
        if self.router.local_users():
            self.log.error("cannot renew the cluster lease (last renewed %.1f s ago: redis "
                           "unreachable, or this process not running): closing %d users' "
                           "connections (ERR unavailable)",
                           self.lease.last_renewed(time.monotonic()),
                           len(self.router.local_users()))
            self.give_up_users()

    def give_up_users(self):
        """Close every user's connection, dropping what they said that Redis
        has not got. Their departures stay queued: a release whose name is
        still ours announces it, exactly once."""
        self.publisher.drop_lines()
        self.router.evict(drop_lines=True)

    # -- sending ---------------------------------------------------------------

    def fencing_args(self):
        """What every script but JOIN starts with: the lease of the moment."""
        return [self.prefix, self.node, self.lease.value]

    def send(self):
        """Send what waits once registered. A fenced node gives no names
        until its lease is renewed: its claims wait."""
        if self.registered and self.commands.up:
            self.publisher.send(hold_claims=self.lease.fenced)

    def end_turn(self, received):
        if self.publisher.end_turn(received, self.leaving is not None):
            if self.leaving and not self.leave_queued:
                self.leave_queued = True
                self.publisher.queue(Op(registry.LEAVE, [registry.STREAM_MAXLEN], self.left))
            self.send()

    # -- what the broker hands over ------------------------------------------

    def publish(self, slot, number, blob):
        self.publisher.broadcast(slot, number, blob)

    def forward_dm(self, slot, number, key, line):
        self.publisher.dm(slot, number, key, line)

    def release(self, key, slot, cid, announce=True):
        self.publisher.release(key, self.owner(slot, cid), announce)

    def knows(self, key):
        return key in self.reader.mirror

    def others(self):
        return self.reader.mirror

    def acknowledgeable(self, received):
        """Worker slot -> the last batch whose lines Redis holds."""
        return self.publisher.confirmed

    def request(self, slot, cid):
        return self.pending.make(slot, cid, time.monotonic())

    def cancel(self, slot, cid=None):
        self.pending.cancel(slot, cid)

    def claim(self, slot, cid, name, peer):
        request = self.request(slot, cid)
        key = name.lower()
        owner = self.owner(slot, cid)
        address, port, tls = peer
        info = "%s %d %d %.0f" % (address, port, tls, time.time())
        op = Op(registry.CLAIM, [key, name, owner, info], None)
        op.on_reply = partial(self.on_claim, request, op, name, owner)
        self.publisher.request(op)

    def on_claim(self, request, op, name, owner, reply):
        key = name.lower()
        stamp = None if isinstance(reply, RedisError) else reply
        if stamp == -1:
            if not request.done:
                self.publisher.retry(op, time.monotonic() + RETRY_DELAY)
            return
        if request.done:                       # answered ERR unavailable meanwhile
            if stamp:
                self.publisher.release(key, owner, False)
            return
        request.done = True
        if stamp is None:
            self.router.answer(request.slot, request.cid, protocol.ERR_UNAVAILABLE)
        elif stamp == 0:
            self.router.answer(request.slot, request.cid, protocol.ERR_USERNAME_TAKEN)
        else:
            self.publisher.claimed(key, owner)
            self.router.grant(request.slot, request.cid, name, stamp)

    def who(self, slot, cid):
        request = self.request(slot, cid)
        self.publisher.request(Op(None, registry.who_command(self.prefix),
                                  partial(self.on_who, request)))

    def on_who(self, request, reply):
        if request.done:
            return
        request.done = True
        if isinstance(reply, RedisError):
            answer = protocol.ERR_UNAVAILABLE
        else:
            answer = protocol.user_lines(name.decode() for name in reply)
        self.router.answer(request.slot, request.cid, answer)

    def find_dm(self, slot, cid, key, line):
        """A DM to a name no directory here knows: Redis says if it exists."""
        request = self.request(slot, cid)
        self.dm_number += 1
        records = bus.Records()
        records.from_batch("dm", self.dm_number)
        records.dm(key, line)
        self.publisher.request(Op(registry.DM, [registry.STREAM_MAXLEN, key, records.encode()],
                                  partial(self.on_dm, request)))

    def on_dm(self, request, reply):
        if request.done:
            return
        request.done = True
        if reply == 1:
            answer = b""
        elif reply == 0:
            answer = protocol.ERR_USER_NOT_FOUND
        else:
            answer = protocol.ERR_UNAVAILABLE
        self.router.answer(request.slot, request.cid, answer)

    # -- the operator's ---------------------------------------------------------

    def control(self, records):
        """The operator's commands for every node: the bans and mutes
        changed in Redis, and one bus entry for the other nodes."""
        changes = []
        for record in records:
            op = record[1]
            if record[0] == "moderation":
                kind = "ban" if op[0] in ("ban", "unban") else "mute"
                kept = op[0] in ("ban", "mute")
                changes += ["moderation", "%s %s" % (kind, op[1]),
                            moderation.encode_op(op) if kept else ""]
            elif record[0] == "account" and op[0] in ("account", "unregister"):
                changes += ["accounts", op[1], accounts.encode_op(op) if op[0] == "account" else ""]
        self.publisher.request(Op(registry.CONTROL,
                                  [registry.STREAM_MAXLEN, bus.encode_control(records)] + changes,
                                  self.on_control))

    def on_control(self, reply):
        if reply == b"lapsed":
            self.log.error("redis refused the operator's command: this node's lease had run out")

    def check_guess(self, group, key, callback):
        self.publisher.request(Op(registry.GUESSES, [group, key, accounts.MAX_FAILURES],
                                  lambda reply: callback(reply == 1)))

    def guess_failed(self, group, key):
        self.publisher.request(Op(registry.FAILED, [group, key, int(accounts.WINDOW * 1000)],
                                  self.on_control))

    def user_rows(self, callback):
        """The other nodes' users, as Redis lists them."""
        self.publisher.request(Op(registry.USERS, [], partial(self.on_users, callback)))

    def on_users(self, callback, reply):
        rows = []
        if not isinstance(reply, RedisError):
            for name, stamp, owner, info in zip(*[iter(reply)] * 4):
                node = owner.decode().split(" ")[0]
                if node == self.node:
                    continue
                address, port, tls, since = (info.decode().split(" ") + ["", "0", "0", "0"])[:4]
                rows.append(UserRow(float(stamp), name.decode(), node, address or None,
                                    int(port), tls == "1", float(since) or None,
                                    None, None, None, None))
        callback(rows)

    # -- stopping ------------------------------------------------------------

    def leave(self, callback):
        """Stopping: our users are announced gone now rather than after the
        lease; the next end_turn queues that after what they said before."""
        self.leaving = (time.monotonic() + LEAVE_TIMEOUT, callback)

    def left(self, reply):
        if self.leaving is not None:
            callback, self.leaving = self.leaving[1], None
            callback()

    def close(self):
        self.commands.close()
        self.reader.close()


def _info_fields(text, fields):
    """The values of ``fields`` in INFO replies, as a tuple (None if one is missing)."""
    found = dict(line.split(b":", 1) for line in text.split(b"\r\n") if b":" in line)
    values = tuple(found.get(field) for field in fields)
    return None if None in values else values
