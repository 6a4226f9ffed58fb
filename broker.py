#!/usr/bin/env python3
"""The chat server's entry point, and the broker: the one authoritative user list.

``python broker.py --workers 4`` starts the supervisor (``chatlib.supervisor``),
which starts an acceptor, the workers and one :class:`Broker` process.

The broker holds the user list (login order, case-insensitive names) and routes
between workers. It never touches a client socket and never parses a chat
line: a worker sends ready-made ``MSG`` lines as one blob per batch and the
broker passes each blob to every other worker, joined with whatever else that
worker gets this turn, as one batch. So its cost is per batch, not per message
and never per recipient: it is the design's serial ceiling, kept thin.

It also keeps the promise that nothing accepted is lost or doubled when it
dies (``chatlib.delivery``): it acknowledges a worker's batches only once all
it routed is in the kernel, and names the origin batch before the lines it
routes, so that workers can drop what a predecessor had routed already.

In cluster mode (``--redis``) a :class:`chatlib.cluster.node.Cluster` beside it
carries to the other nodes what they must see, and brings back what they
send; the broker's routing between its own workers stays as it is, and
``users`` holds this node's users only.
"""

import sys
import time
from functools import partial
from multiprocessing.connection import Connection

from chatlib import link, protocol
from chatlib.cluster import bus
from chatlib.channel import Channel
from chatlib.service import Service

LAZY_DELAY = 0.02   # seconds an acknowledgement or a new name waits for a batch to ride on
NO_ORIGIN = (link.SEQ, None)


class _Run(list):
    """Consecutive MSG blobs for one worker, joined into one at send time."""


class Broker(Service):
    role = "broker"

    def __init__(self, config, pipes, expected=()):
        super().__init__(config, pipes)
        self.channels = {}              # slot -> Channel
        self.outboxes = {}              # slot -> events for that worker this turn
        self.received = {}              # slot -> number of the last batch taken from it
        self.ackable = {}               # slot -> the last one safely routed (in the kernel)
        self.acked = {}                 # slot -> the last one it has been told of
        self.lazy = {}                  # slot -> new names, sent with its next batch
        self.lazy_due = None            # when acknowledgements and new names go
                                        # without a batch
        self.origin = None              # (slot, batch number) being routed
        self.marked = {}                # slot -> the origin its outbox last named
        # A restarted broker must not decide anything (a LOGIN above all)
        # before every worker has told it who is logged in there.
        self.unsynced = set(expected)   # workers whose SYNC we still await
        self.deferred = []              # (slot, event) held until then
        self.unlisted = set()           # synced workers still owed the directory
        self.listed = {}                # slot -> other users its directory listed at its
                                        # SYNC, {key: name}, until all have synced
        self.claimed = set()            # names the synced workers' LOGINs claim again
        self.told_early = {}            # slot -> names whose LEFT it was sent before
                                        # its SYNC came (which still lists them)
        self.last_stamp = 0             # login times, to keep WHO in login order
        self.users = {}                 # lower-case name -> (name, slot, cid, stamp), login order
        self.owner = {}                 # (slot, cid) -> lower-case name
        self.who_cache = None           # the USER lines, rebuilt after a change
        self.paused = False
        self.cursor = None              # cluster mode: the last bus entry routed
        self.cursor_told = {}           # slot -> the cursor it was last told
        self.cluster = None             # cluster mode: made in start(), on our selector
        self.ready_when_started = config.redis is None   # a node: once it has joined
        # A node routes nothing before its first JOIN has checked, against
        # the registry, the users its workers hold (see chatlib.cluster).
        self.registered = config.redis is None
        self.vouched_until = None       # cluster mode: the workers run users' lines until then

    # -- set-up and control ---------------------------------------------------

    def attach(self, slot, conn):
        """Start routing to worker ``slot`` over ``conn`` (a new or restarted worker)."""
        self.detach(slot)
        self.channels[slot] = Channel(conn, self.sel, partial(self.on_batches, slot),
                                      partial(self.on_link_lost, slot))
        self.outboxes[slot] = []
        self.received[slot] = self.ackable[slot] = self.acked[slot] = 0
        self.lazy[slot] = []
        if self.vouched_until is not None:
            self.lazy[slot].append((link.LEASE, self.vouched_until))
        self.unsynced.add(slot)

    def detach(self, slot):
        """Forget worker ``slot``: its users are gone, everyone else hears so."""
        channel = self.channels.pop(slot, None)
        if channel is None:
            return
        channel.close()
        self.outboxes.pop(slot, None)
        for per_slot in (self.received, self.ackable, self.acked, self.lazy, self.cursor_told):
            per_slot.pop(slot, None)
        self.unsynced.discard(slot)
        self.marked.pop(slot, None)
        self.deferred = [(s, event) for s, event in self.deferred if s != slot]
        if self.cluster is not None:
            self.cluster.cancel(slot)
        self.origin = None                      # its departures come from no batch
        for key in [k for k, user in self.users.items() if user[1] == slot]:
            self.log_out(slot, self.users[key][2])
        self.run_deferred()

    def start(self):
        if self.config.redis is not None:
            from chatlib.cluster.node import Cluster
            self.cluster = Cluster(self)
            self.cluster.start()

    def stop(self):
        if self.cluster is not None:
            self.cluster.leave(self.stopped)
        else:
            self.stopped()

    def stopped(self):
        self.running = False

    def on_link_lost(self, slot):
        self.log.debug("worker-%d link lost", slot)
        self.detach(slot)

    def on_order(self, order):
        if order[0] == "attach":
            self.attach(order[1], Connection(self.received_fd()))
        elif order[0] == "detach":
            self.detach(order[1])
        else:
            super().on_order(order)

    def heartbeat_info(self):
        info = {"users": len(self.users)}
        if self.cluster is not None:
            info["cluster"] = self.cluster.figures()
        return info

    def finish(self):
        for channel in self.channels.values():
            channel.close()
        if self.cluster is not None:
            self.cluster.close()

    # -- the loop -------------------------------------------------------------

    def on_events(self, events):
        if self.cluster is not None:
            self.cluster.check_lease(time.monotonic())
        for key, mask in events:
            key.data(mask)
        self.end_turn()

    def poll_timeout(self):
        due = self.lazy_due
        if self.cluster is not None:
            wakeup = self.cluster.next_wakeup()
            if wakeup is not None:
                due = wakeup if due is None else min(due, wakeup)
        if due is None:
            return self.heartbeat_interval
        return max(0.0, min(self.heartbeat_interval, due - time.monotonic()))

    def tick(self, now):
        """Backpressure: while a worker cannot take more, read from nobody."""
        if self.lazy_due is not None and now >= self.lazy_due:
            self.send_lazy()
        congested = any(ch.congested for ch in self.channels.values())
        if self.cluster is not None:
            self.cluster.tick(now)
            if any(self.outboxes.values()):     # answers to requests that waited too long
                self.end_turn()
            congested = congested or self.cluster.congested
        if congested != self.paused:
            self.paused = congested
            for channel in self.channels.values():
                channel.set_reading(not congested)

    def end_turn(self):
        """Send each worker one batch with everything it got this turn.

        A send can find a link dead, and detaching that worker queues INFO
        lines for the others: loop until every outbox is empty.
        """
        while any(self.outboxes.values()):
            for slot in list(self.outboxes):
                box = self.outboxes.get(slot)
                if box:
                    self.outboxes[slot] = []
                    self.marked.pop(slot, None)
                    batch = [(link.MSG, b"".join(e)) if type(e) is _Run else e for e in box]
                    if self.lazy[slot] or self.cursor is not None:
                        batch[:0] = self.take_lazy(slot)
                    if self.ackable[slot] != self.acked[slot]:
                        self.acked[slot] = self.ackable[slot]
                        batch.append((link.ACK, self.acked[slot]))
                    self.channels[slot].send(batch)
        if self.cluster is not None:
            self.cluster.end_turn(self.received)
        self.mark_ackable()

    def mark_ackable(self):
        """Once all that was routed is in the kernel, what the workers sent
        may be acknowledged: on the next batch to them, or on its own after
        LAZY_DELAY, so that acknowledging costs no extra frame under load."""
        if self.deferred or any(ch.pending_bytes for ch in self.channels.values()):
            return
        if self.cluster is None:
            self.ackable.update(self.received)
        else:                                   # of the workers attached now
            self.ackable.update((slot, n) for slot, n in self.cluster.confirmed.items()
                                if slot in self.received)
        if self.ackable != self.acked:
            self.lazy_soon()

    def lazy_soon(self):
        if self.lazy_due is None:
            self.lazy_due = time.monotonic() + LAZY_DELAY

    def send_lazy(self):
        """What waited for a batch to ride on goes on its own."""
        self.lazy_due = None
        for slot, n in self.ackable.items():
            if n != self.acked[slot]:
                self.outboxes[slot].append((link.ACK, n))
                self.acked[slot] = n
            self.flush_lazy(slot)
        self.end_turn()

    def flush_lazy(self, slot):
        self.outboxes[slot].extend(self.take_lazy(slot))

    def take_lazy(self, slot):
        """What waits for the next batch to ``slot``: new names, and in
        cluster mode the bus cursor if it moved."""
        events, self.lazy[slot] = self.lazy[slot], []
        if self.cursor is not None and self.cursor_told.get(slot) != self.cursor:
            self.cursor_told[slot] = self.cursor
            events.append((link.CURSOR, self.cursor))
        return events

    def on_batches(self, slot, batches):
        for batch in batches:
            self.take(slot, NO_ORIGIN)          # until the batch's SEQ
            for event in batch:
                self.take(slot, event)
        self.run_deferred()

    def take(self, slot, event):
        if (self.unsynced or not self.registered) and event[0] != link.SYNC:
            self.deferred.append((slot, event))
        else:
            self.route(slot, event)

    def run_deferred(self):
        if self.deferred and not self.unsynced and self.registered:
            deferred, self.deferred = self.deferred, []
            for slot, event in deferred:
                self.route(slot, event)
        # After them: a name granted now rides ahead of the batch, and a
        # directory sent before the grant would drop it again.
        self.send_directories()
        if self.cluster is not None and not self.unsynced:
            self.cluster.synced()

    # -- routing --------------------------------------------------------------

    def route(self, slot, event):
        tag = event[0]
        if tag == link.MSG:
            self.broadcast(event[1], skip=slot)
            if self.cluster is not None:
                self.cluster.add_msg(slot, self.origin[1], event[1])
        elif tag == link.LOGIN:
            self.log_in(slot, event[1], event[2])
        elif tag == link.WHO:
            if self.cluster is not None:
                self.cluster.who(slot, event[1])
                return
            if self.who_cache is None:
                self.who_cache = protocol.user_lines(user[0] for user in self.users.values())
            self.answer(slot, event[1], self.who_cache)
        elif tag == link.DM:
            _, cid, key, line, awaited = event
            target = self.users.get(key)
            if target is not None:
                _, tslot, tcid, _ = target
                self.box(tslot).append((link.DELIVER, tcid, line))
                if awaited:
                    self.answer(slot, cid, b"")
            elif self.cluster is not None and self.cluster.knows(key):
                self.cluster.add_dm(slot, self.origin[1], key, line)
                if awaited:
                    self.answer(slot, cid, b"")
            elif self.cluster is not None and awaited:
                self.cluster.dm(slot, cid, key, line)
            elif awaited:
                self.answer(slot, cid, protocol.ERR_USER_NOT_FOUND)
            else:
                # The sender's directory was a moment behind: tell it anyway.
                self.box(slot).append((link.DELIVER, cid, protocol.ERR_USER_NOT_FOUND))
        elif tag == link.BYE:
            self.log_out(slot, event[1])
        elif tag == link.SEQ:
            self.origin = None if event[1] is None else (slot, event[1])
            if event[1] is not None:
                self.received[slot] = event[1]
        elif tag == link.SYNC:
            self.sync(slot, event[1], event[2], event[4], event[5])
            if self.cluster is not None:
                self.cluster.note_cursor(event[3])
        else:
            self.log.error("unknown event from worker-%d: %r", slot, tag)

    def answer(self, slot, cid, data):
        self.outboxes[slot].append((link.ANSWER, cid, data))

    def tell_all(self, event):
        """A change of the directory for every worker. A new name waits for
        the next batch to each (a worker that does not know it yet only
        waits for the broker's answer to a DM), so a burst of logins does
        not wake every worker; a departure goes now, after those. A new name
        carries the name as typed (None: another node's user), for the
        worker to tell a restarted broker (announce_missing)."""
        if event[0] == link.JOINED:
            user = self.users.get(event[1])
            event = (link.JOINED, event[1], user and user[0])
            for waiting in self.lazy.values():
                waiting.append(event)
            self.lazy_soon()
            return
        for names in self.listed.values():      # told now: not missing
            names.pop(event[1], None)
        for slot in self.unsynced.intersection(self.outboxes):
            self.told_early.setdefault(slot, set()).add(event[1])
        for slot in self.outboxes:
            self.flush_lazy(slot)
            self.outboxes[slot].append(event)

    def box(self, slot):
        """``slot``'s outbox, after a FROM naming the batch being routed, so
        that the worker can drop what a previous broker routed already."""
        box = self.outboxes[slot]
        if self.marked.get(slot) != self.origin:
            self.marked[slot] = self.origin
            box.append((link.FROM,) + (self.origin or (None, None)))
        return box

    def broadcast(self, blob, skip=None):
        for slot in self.outboxes:
            if slot == skip:
                continue
            box = self.box(slot)
            if box and type(box[-1]) is _Run:
                box[-1].append(blob)
            else:
                box.append(_Run((blob,)))

    def register(self, name, slot, cid, stamp):
        key = name.lower()
        stale = self.users.get(key)
        if stale is not None:                   # a departed user's, from a SYNC
            self.owner.pop((stale[1], stale[2]), None)
        self.users[key] = (name, slot, cid, stamp)
        self.owner[(slot, cid)] = key
        self.who_cache = None
        self.last_stamp = max(self.last_stamp, stamp)

    def sync(self, slot, users, departed, listed, claims):
        """A worker's users, as it holds them (a restarted broker learns them),
        and those whose BYE it sends again: registered only if nobody holds
        the name now, since their BYE may have been routed already. Also the
        other users its directory lists, and the names its LOGINs claim
        again, for announce_missing."""
        for cid, name, stamp in users:
            self.register(name, slot, cid, stamp)
        for cid, name, stamp in departed:
            if name.lower() not in self.users:
                self.register(name, slot, cid, stamp)
        if users or departed:
            self.users = dict(sorted(self.users.items(), key=lambda item: item[1][3]))
        told = self.told_early.pop(slot, ())
        self.listed[slot] = {key: name for key, name in listed.items() if key not in told}
        self.claimed.update(claims)
        self.unsynced.discard(slot)
        self.unlisted.add(slot)

    def send_directories(self):
        """Once every worker has synced, the ones that lack it get the
        directory (name as typed by key; None for other nodes' users), then
        the departures they missed."""
        if self.unlisted and not self.unsynced:
            names = dict.fromkeys(self.cluster.mirror) if self.cluster is not None else {}
            names.update((key, user[0]) for key, user in self.users.items())
            for slot in self.unlisted:
                if slot in self.outboxes:
                    self.outboxes[slot].append((link.DIRECTORY, names))
            self.unlisted.clear()
            self.announce_missing()

    def announce_missing(self):
        """The INFO lines a worker that died with the old broker took along.

        A worker lists every user whose lines it may have delivered (JOINED
        goes before them). A user it listed at its SYNC whom no worker holds
        now, nor claims again with a LOGIN the old broker may have granted,
        was on a worker that died unannounced, to this worker at least (one
        told already had dropped the name): it gets the INFO, once, from no
        batch. The DIRECTORY it was just sent no longer lists the name.
        """
        listed, self.listed = self.listed, {}
        claimed, self.claimed = self.claimed, set()
        origin, self.origin = self.origin, None
        for slot, names in listed.items():
            gone = [name for key, name in names.items()
                    if key not in self.users and key not in claimed]
            if gone and slot in self.outboxes:
                blob = b"".join(protocol.info_disconnected(name) for name in gone)
                self.box(slot).append((link.MSG, blob))
        self.origin = origin

    def log_in(self, slot, cid, name):
        """Atomic across workers: the broker is the only one who decides
        (in cluster mode, Redis decides for the whole cluster)."""
        if name.lower() in self.users:
            self.answer(slot, cid, protocol.ERR_USERNAME_TAKEN)
        elif self.cluster is not None:
            self.cluster.claim(slot, cid, name)
        else:
            self.grant(slot, cid, name, max(time.time_ns(), self.last_stamp + 1))

    def grant(self, slot, cid, name, stamp):
        if slot not in self.outboxes:
            if self.cluster is not None:        # its worker died meanwhile
                self.cluster.release(name.lower(), slot, cid, announce=False)
            return
        self.register(name, slot, cid, stamp)
        self.outboxes[slot].append((link.GRANTED, cid, name, stamp))
        self.tell_all((link.JOINED, name.lower()))

    def log_out(self, slot, cid):
        key = self.owner.pop((slot, cid), None)
        if key is None:                         # never logged in
            if self.cluster is not None:
                self.cluster.cancel(slot, cid)  # a claim it was waiting for
            return
        name = self.users.pop(key)[0]
        self.who_cache = None
        self.tell_all((link.LEFT, key))
        self.broadcast(protocol.info_disconnected(name))
        if self.cluster is not None:
            self.cluster.release(key, slot, cid)

    # -- cluster mode: what other nodes send ----------------------------------

    def route_remote(self, node, records):
        """Another node's lines, records of :mod:`chatlib.cluster.bus`, under a FROM
        naming their origin batch there."""
        for record in records:
            tag = record[0]
            if tag == bus.MSG:
                self.broadcast(record[1])
            elif tag == bus.DM:
                target = self.users.get(record[1])
                if target is not None:
                    self.box(target[1]).append((link.DELIVER, target[2], record[2]))
            else:
                self.origin = ((node, record[1]), record[2])
        self.origin = None

    def remote_joined(self, key):
        self.tell_all((link.JOINED, key))

    def remote_left(self, key):
        self.tell_all((link.LEFT, key))

    def remote_departures(self, names, number):
        """Users gone from other nodes: an INFO each, numbered by bus entry."""
        self.origin = ("left", number)
        for name in names:
            self.tell_all((link.LEFT, name.lower()))
            self.broadcast(protocol.info_disconnected(name))
        self.origin = None

    def tell_cursor(self, cursor):
        """The bus entries up to ``cursor`` are routed: workers learn it with
        their next batch, for a restarted broker to resume from."""
        self.cursor = cursor
        self.lazy_soon()

    def directory_changed(self):
        self.unlisted.update(self.outboxes)
        self.send_directories()

    def joined(self):
        """The first JOIN has checked our users: route what waited for it."""
        if not self.registered:
            self.registered = True
            self.run_deferred()

    def vouch(self, until):
        """The lease holds until ``until`` (``time.monotonic()``): workers
        run their users' lines until then, and no longer. In order with the
        rest (not riding ahead of a batch, as new names do): after an EVICT,
        since a worker runs the lines it held once it gets this."""
        self.vouched_until = until
        for box in self.outboxes.values():
            box.append((link.LEASE, until))

    def evict(self, keys=None, drop_lines=False):
        """The node cannot vouch for its users any more: close their
        connections (``keys``: only those) with ERR unavailable. With
        ``drop_lines``, every user goes, and their lines still waiting to
        be routed go with them."""
        if drop_lines:
            self.deferred = [(slot, event) for slot, event in self.deferred
                             if event[0] != link.MSG and event[0] != link.DM]
        for slot in self.outboxes:
            cids = None if keys is None else [self.users[k][2] for k in keys
                                              if k in self.users and self.users[k][1] == slot]
            if cids is None or cids:
                self.outboxes[slot].append((link.EVICT, protocol.ERR_UNAVAILABLE, cids))


def main(argv=None):
    import socket
    if not hasattr(socket, "SCM_RIGHTS"):
        # Before anything else: the processes hand client sockets to one
        # another over Unix sockets (SCM_RIGHTS), which Windows lacks.
        sys.stderr.write("chat-server runs on Linux and macOS; on Windows, use WSL\n")
        return 2
    from chatlib.config import parse_args
    from chatlib.supervisor import Supervisor
    return Supervisor(parse_args(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
