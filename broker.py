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

It is also the operator's hand on the chat (``broker.py ctl``, relayed by
the supervisor): it kicks, keeps the chat's bans and mutes
(:mod:`chatlib.moderation`), saves them in the state directory, and hands
them to its workers, which enforce them, and to the supervisor, for the
acceptor. A LOGIN of a registered name passes its gate first
(:mod:`chatlib.gate`: the accounts, and passwords checked off the loop).

Names beyond this host's users are a directory's (:mod:`chatlib.directory`):
on one host every claim is granted at once; in cluster mode (``--redis``) a
:class:`chatlib.cluster.node.Cluster` asks Redis, carries to the other nodes
what they must see and brings back what they send. The broker's routing
between its own workers is the same either way, and ``users`` holds this
host's users only.
"""

import os
import sys
import time
from functools import partial
from multiprocessing.connection import Connection

from chatlib import link, moderation, protocol, statefile
from chatlib.channel import Channel
from chatlib.control.users import utc
from chatlib.directory import LocalDirectory, Router, User
from chatlib.gate import Gate
from chatlib.service import Service

# Why a worker cuts a user when told to (it logs and counts it: worker.DISCONNECT_LABELS).
KICKED = "kicked"
UNAVAILABLE = "cluster unavailable"

RETIRE_TIMEOUT = 3.0  # seconds a retiring broker waits for what it routed to be confirmed
RETIRE_POLL = 0.002   # ...looking this often
LAZY_DELAY = 0.02   # seconds an acknowledgement or a new name waits for a batch to ride on
NO_ORIGIN = (link.SEQ, None)


class _Run(list):
    """Consecutive MSG blobs for one worker, joined into one at send time."""


class WorkerLink:
    """Everything the broker knows about one worker, made and dropped together."""

    def __init__(self, channel):
        self.channel = channel
        self.outbox = []            # events for it this turn
        self.received = 0           # number of the last batch taken from it
        self.ackable = 0            # the last one safely routed (its lines in the kernel)
        self.acked = 0              # the last one it has been told of
        self.lazy = []              # new names, sent with its next batch
        self.marked = None          # the origin its outbox last named (FROM)
        self.cursor_told = None     # cluster mode: the bus cursor it was last told
        self.listed = {}            # at its SYNC: other users its directory listed,
                                    # {key: name}, until every worker has synced
        self.told_early = set()     # names whose LEFT it got before its SYNC came
        self.owes_directory = False  # synced, still to be sent the directory


class Broker(Service, Router):
    role = "broker"

    def __init__(self, config, pipes, expected=(), bans=None, accounts=None, standby=False):
        """``standby``: an upgrade's broker, which starts its directory (joins
        the cluster) only when told to ``begin``, once its predecessor retired."""
        super().__init__(config, pipes)
        self.standby = standby
        self.retiring = None            # an upgrade: until when we wait to acknowledge all
        self.moderation = bans or moderation.Moderation()   # the chat's bans and mutes
        self.gate = Gate(config, accounts, self.log, self)   # accounts, passwords
        self.links = {}                 # slot -> WorkerLink
        self.lazy_due = None            # when acknowledgements and new names go
                                        # without a batch
        self.origin = None              # (slot, batch number) being routed
        # A restarted broker must not decide anything (a LOGIN above all)
        # before every worker has told it who is logged in there.
        self.unsynced = set(expected)   # workers whose SYNC we still await
        self.deferred = []              # (slot, event) held until then
        self.claimed = set()            # names the synced workers' LOGINs claim again
        self.last_stamp = 0             # login times, to keep WHO in login order
        self.users = {}                 # lower-case name -> User, login order
        self.owner = {}                 # (slot, cid) -> lower-case name
        self.who_cache = None           # the USER lines, rebuilt after a change
        self.paused = False
        self.cursor = None              # cluster mode: the last bus entry routed
        self.vouched_until = None       # cluster mode: the workers run users' lines until then
        self.directory = None           # made in start(), on our selector
        self.registered = True          # until start(): the directory's routes_at_once

    # -- set-up and control ---------------------------------------------------

    def attach(self, slot, conn):
        """Start routing to worker ``slot`` over ``conn`` (a new or restarted worker)."""
        self.detach(slot)
        worker = self.links[slot] = WorkerLink(
            Channel(conn, self.sel, partial(self.on_batches, slot),
                    partial(self.on_link_lost, slot)))
        if self.vouched_until is not None:
            worker.lazy.append((link.LEASE, self.vouched_until))
        if self.moderation:
            worker.lazy.append((link.MODERATION, self.moderation))
        self.unsynced.add(slot)

    def detach(self, slot):
        """Forget worker ``slot``: its users are gone, everyone else hears so."""
        worker = self.links.pop(slot, None)
        if worker is None:
            return
        worker.channel.close()
        self.unsynced.discard(slot)
        self.deferred = [(s, event) for s, event in self.deferred if s != slot]
        self.directory.cancel(slot)
        self.gate.forget(slot)
        self.origin = None                      # its departures come from no batch
        for key in [k for k, user in self.users.items() if user.slot == slot]:
            self.log_out(slot, self.users[key].cid)
        self.run_deferred()

    def start(self):
        if self.config.redis is not None:
            from chatlib.cluster.node import Cluster
            self.directory = Cluster(self.config, self.sel, self.log, self)
        else:
            self.directory = LocalDirectory(self)
        self.gate.start(self.sel, self.directory)
        self.ready_when_started = self.directory.ready_at_start or self.standby
        self.registered = self.directory.routes_at_once
        if not self.standby:
            self.directory.start()

    def stop(self):
        self.directory.leave(self.stopped)

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
        elif order[0] == "control":
            _, request, command, words = order
            self.control(request, command, words)
        elif order[0] == "begin":         # an upgrade: our predecessor is gone
            _, self.moderation, self.gate.accounts = order
            self.standby = False
            self.directory.start()
        elif order[0] == "retire":        # an upgrade: our successor is waiting
            self.retire()
        else:
            super().on_order(order)

    def heartbeat_info(self):
        info = {"users": len(self.users)}
        figures = self.directory.figures()
        if figures is not None:
            info["cluster"] = figures
        return info

    def finish(self):
        for worker in self.links.values():
            worker.channel.close()
        self.directory.close()
        self.gate.close()

    # -- the loop -------------------------------------------------------------

    def on_events(self, events):
        self.directory.check_lease()            # before anything is routed
        for key, mask in events:
            key.data(mask)
        self.end_turn()

    def poll_timeout(self):
        if self.retiring is not None:
            return RETIRE_POLL
        due = self.lazy_due
        for wakeup in (self.directory.next_wakeup(), self.gate.next_wakeup()):
            if wakeup is not None:
                due = wakeup if due is None else min(due, wakeup)
        if due is None:
            return self.heartbeat_interval
        return max(0.0, min(self.heartbeat_interval, due - time.monotonic()))

    def tick(self, now):
        """Backpressure: while a worker (or Redis) cannot take more, read from nobody."""
        if self.retiring is not None:
            self.check_retired(now)
            return
        if self.standby:
            return
        if self.lazy_due is not None and now >= self.lazy_due:
            self.send_lazy()
        self.gate.tick(now)
        self.directory.tick(now)
        if any(worker.outbox for worker in self.links.values()):
            self.end_turn()                     # answers to requests that waited too long
        congested = self.directory.congested or any(
            worker.channel.congested for worker in self.links.values())
        if congested != self.paused:
            self.paused = congested
            for worker in self.links.values():
                worker.channel.set_reading(not congested)

    def end_turn(self):
        """Send each worker one batch with everything it got this turn.

        A send can find a link dead, and detaching that worker queues INFO
        lines for the others: loop until every outbox is empty.
        """
        while any(worker.outbox for worker in self.links.values()):
            for slot in list(self.links):
                worker = self.links.get(slot)
                if worker is not None and worker.outbox:
                    box, worker.outbox = worker.outbox, []
                    worker.marked = None
                    batch = [(link.BROADCAST, b"".join(e)) if type(e) is _Run else e for e in box]
                    if worker.lazy or self.cursor is not None:
                        batch[:0] = self.lazy_events(worker)
                    if worker.ackable != worker.acked:
                        worker.acked = worker.ackable
                        batch.append((link.ACK, worker.acked))
                    worker.channel.send(batch)
        received = {slot: worker.received for slot, worker in self.links.items()}
        self.directory.end_turn(received)
        self.mark_ackable(received)

    def mark_ackable(self, received):
        """Once all that was routed is in the kernel (and, for a node, in
        Redis), what the workers sent may be acknowledged: on the next batch
        to them, or on its own after LAZY_DELAY, so that acknowledging costs
        no extra frame under load."""
        if self.deferred or any(w.channel.pending_bytes for w in self.links.values()):
            return
        for slot, number in self.directory.acknowledgeable(received).items():
            worker = self.links.get(slot)               # of the workers attached now
            if worker is not None:
                worker.ackable = number
                if number != worker.acked:
                    self.lazy_soon()

    def lazy_soon(self):
        if self.lazy_due is None:
            self.lazy_due = time.monotonic() + LAZY_DELAY

    def send_lazy(self):
        """What waited for a batch to ride on goes on its own."""
        self.lazy_due = None
        for worker in self.links.values():
            if worker.ackable != worker.acked:
                worker.outbox.append((link.ACK, worker.ackable))
                worker.acked = worker.ackable
            worker.outbox.extend(self.lazy_events(worker))
        self.end_turn()

    def lazy_events(self, worker):
        """What waits for the next batch to ``worker``: new names, and in
        cluster mode the bus cursor if it moved."""
        events, worker.lazy = worker.lazy, []
        if self.cursor is not None and worker.cursor_told != self.cursor:
            worker.cursor_told = self.cursor
            events.append((link.CURSOR, self.cursor))
        return events

    def retire(self):
        """An upgrade: read no more from the workers, acknowledge everything
        routed (in cluster mode, once Redis has it), then leave, without
        leaving the cluster: our successor keeps the node's lease and names.
        What we did not route, the workers give our successor."""
        self.retiring = time.monotonic() + RETIRE_TIMEOUT
        for worker in self.links.values():
            worker.channel.set_reading(False)
        self.end_turn()

    def check_retired(self, now):
        self.directory.tick(now)
        self.end_turn()
        settled = all(worker.ackable == worker.received for worker in self.links.values())
        if not settled and now < self.retiring:
            return
        if not settled:
            self.log.warning("upgrade: retiring with batches Redis did not confirm; "
                             "the new broker gets them again")
        for worker in self.links.values():
            if worker.ackable != worker.acked:
                worker.acked = worker.ackable
                worker.outbox.append((link.ACK, worker.acked))
        self.end_turn()
        for worker in self.links.values():
            worker.channel.flush_blocking(1.0)
        self.running = False

    def on_batches(self, slot, batches):
        for batch in batches:
            self.route_or_defer(slot, NO_ORIGIN)          # until the batch's SEQ
            for event in batch:
                self.route_or_defer(slot, event)
        self.run_deferred()

    def route_or_defer(self, slot, event):
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
        if not self.unsynced:
            self.directory.synced()

    # -- routing --------------------------------------------------------------

    def route(self, slot, event):
        tag = event[0]
        if tag == link.BROADCAST:
            _, blob = event
            self.broadcast(blob, skip=slot)
            self.directory.publish(slot, self.origin[1], blob)
        elif tag == link.LOGIN:
            _, cid, name, peer, password = event
            self.gate.log_in(slot, cid, name, peer, password)
        elif tag == link.REGISTER or tag == link.PASSWORD:
            _, cid, password, tls = event
            key = self.owner.get((slot, cid))
            user = (key, self.users[key].name) if key is not None else None
            self.gate.register(slot, cid, user, password, tls, tag == link.PASSWORD)
        elif tag == link.WHO:
            _, cid = event
            self.directory.who(slot, cid)
        elif tag == link.DM:
            self.route_dm(slot, *event[1:])
        elif tag == link.BYE:
            self.log_out(slot, event[1])
        elif tag == link.SEQ:
            _, number = event
            self.origin = None if number is None else (slot, number)
            if number is not None:
                self.links[slot].received = number
        elif tag == link.SYNC:
            _, users, departed, cursor, listed, claims = event
            self.sync(slot, users, departed, listed, claims)
            self.directory.note_cursor(cursor)
        else:
            self.log.error("unknown event from worker-%d: %r", slot, tag)

    def route_dm(self, slot, cid, key, line, awaited):
        """A ``DM`` to ``key``: ``awaited`` if its sender waits for the
        answer (its directory did not know the name)."""
        target = self.users.get(key)
        if target is not None:
            self.box(target.slot).append((link.DELIVER, target.cid, line))
        elif self.directory.knows(key):
            self.directory.forward_dm(slot, self.origin[1], key, line)
        elif awaited:
            self.directory.find_dm(slot, cid, key, line)
            return
        else:
            # The sender's directory was a moment behind: tell it anyway.
            self.box(slot).append((link.DELIVER, cid, protocol.ERR_USER_NOT_FOUND))
        if awaited:
            self.answer(slot, cid, b"")

    def answer(self, slot, cid, data):
        self.links[slot].outbox.append((link.ANSWER, cid, data))

    def tell_all(self, event):
        """A change of the directory for every worker. A new name waits for
        the next batch to each (a worker that does not know it yet only
        waits for the broker's answer to a DM), so a burst of logins does
        not wake every worker; a departure goes now, after those. A new name
        carries the name as typed (None: another node's user), for the
        worker to tell a restarted broker (announce_missing)."""
        key = event[1]
        if event[0] == link.JOINED:
            user = self.users.get(key)
            event = (link.JOINED, key, user and user.name)
            for worker in self.links.values():
                worker.lazy.append(event)
            self.lazy_soon()
            return
        for slot, worker in self.links.items():
            worker.listed.pop(key, None)        # told now: not missing
            if slot in self.unsynced:
                worker.told_early.add(key)
            worker.outbox.extend(self.lazy_events(worker))
            worker.outbox.append(event)

    def box(self, slot):
        """``slot``'s outbox, after a FROM naming the batch being routed, so
        that the worker can drop what a previous broker routed already."""
        worker = self.links[slot]
        if worker.marked != self.origin:
            worker.marked = self.origin
            worker.outbox.append((link.FROM,) + (self.origin or (None, None)))
        return worker.outbox

    def broadcast(self, blob, skip=None):
        for slot in self.links:
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
            self.owner.pop((stale.slot, stale.cid), None)
        self.users[key] = User(name, slot, cid, stamp)
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
            self.users = dict(sorted(self.users.items(), key=lambda item: item[1].stamp))
        worker = self.links[slot]
        worker.listed = {key: name for key, name in listed.items()
                         if key not in worker.told_early}
        worker.told_early = set()
        self.claimed.update(claims)
        self.unsynced.discard(slot)
        worker.owes_directory = True

    def send_directories(self):
        """Once every worker has synced, the ones that lack it get the
        directory (name as typed by key; None for other nodes' users), then
        the departures they missed."""
        owed = [worker for worker in self.links.values() if worker.owes_directory]
        if owed and not self.unsynced:
            names = dict.fromkeys(self.directory.others())
            names.update((key, user.name) for key, user in self.users.items())
            for worker in owed:
                worker.outbox.append((link.DIRECTORY, names))
                worker.owes_directory = False
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
        claimed, self.claimed = self.claimed, set()
        origin, self.origin = self.origin, None
        for slot, worker in self.links.items():
            listed, worker.listed = worker.listed, {}
            gone = [name for key, name in listed.items()
                    if key not in self.users and key not in claimed]
            if gone:
                blob = b"".join(protocol.info_disconnected(name) for name in gone)
                self.box(slot).append((link.BROADCAST, blob))
        self.origin = origin

    def claim_name(self, slot, cid, name, peer):
        """Atomic across workers: the broker is the only one who decides
        (in cluster mode, Redis decides for the whole cluster). A name
        banned a moment ago, before the worker knew, is refused here."""
        if name.lower() in self.users:
            self.answer(slot, cid, protocol.ERR_USERNAME_TAKEN)
        elif self.moderation and self.moderation.banned_name(name.lower(), time.time()):
            self.answer(slot, cid, protocol.ERR_BANNED)
        else:
            self.directory.claim(slot, cid, name, peer)

    def log_out(self, slot, cid):
        key = self.owner.pop((slot, cid), None)
        if key is None:                         # never logged in
            self.directory.cancel(slot, cid)    # a claim it was waiting for
            self.gate.forget(slot, cid)         # or a password check
            return
        name = self.users.pop(key).name
        self.who_cache = None
        self.tell_all((link.LEFT, key))
        self.broadcast(protocol.info_disconnected(name))
        self.directory.release(key, slot, cid)

    # -- the operator's commands (``ctl``, relayed by the supervisor) ---------

    def control(self, request, command, rest):
        """Run the operator's ``command`` (its arguments in ``rest``); the
        supervisor gets the answer as ``("answer", request, lines, error)``."""
        handler = getattr(self, "handle_" + command, None)
        if handler is None:
            self.reply(request, [], "unknown-command %s" % command)
            return
        try:
            handler(request, rest)
        except ValueError as exc:
            self.reply(request, [], "bad-argument %s" % exc)

    def reply(self, request, lines=(), error=None):
        self._report(("answer", request, list(lines), error))

    def handle_users(self, request, rest):
        """The other nodes' users (this node's come from the workers)."""
        self.directory.user_rows(lambda rows: self.reply(request, rows))

    def handle_kick(self, request, rest):
        name, _, reason = rest.partition(" ")
        if not name:
            raise ValueError("usage: kick NAME [REASON]")
        key, reason = name.lower(), reason.strip()
        if key in self.users:
            self.kick(key, reason)
        elif self.directory.knows(key):
            self.directory.control([("kick", key, reason)])
        else:
            self.reply(request, [], "user-not-found")
            return
        self.log.info("operator: kicked %s%s", name, " (%s)" % reason if reason else "")
        self.reply(request)

    def kick(self, key, reason):
        user = self.users[key]
        self.links[user.slot].outbox.append(
            (link.EVICT, protocol.err_kicked(reason), [user.cid], KICKED))

    def handle_ban(self, request, rest):
        words = rest.split(None, 1)
        if not words:
            raise ValueError("usage: ban TARGET [DURATION] [REASON]")
        target = moderation.parse_target(words[0])
        rest = words[1] if len(words) > 1 else ""
        expires, reason = self.duration_and_reason(rest)
        now = time.time()
        self.moderate([("ban", target, expires, reason, now)])
        self.log.info("operator: banned %s until %s%s", target, utc(expires),
                      " (%s)" % reason if reason else "")
        self.reply(request)

    def handle_unban(self, request, rest):
        self.lift(request, ("unban", moderation.parse_target(rest.strip())), "unbanned",
                  "not-banned")

    def handle_bans(self, request, rest):
        now = time.time()
        lines = ["ban %s until=%s since=%s%s" % (
            ban.target, utc(ban.expires), utc(ban.since),
            " reason=%s" % ban.reason if ban.reason else "")
            for ban in self.moderation.bans_listing(now)]
        lines += ["mute %s until=%s since=%s" % (mute.key, utc(mute.expires), utc(mute.since))
                  for mute in self.moderation.mutes_listing(now)]
        self.reply(request, lines)

    def handle_mute(self, request, rest):
        key, expires = self.name_and_until(rest, "mute NAME [DURATION]")
        self.moderate([("mute", key, expires, time.time())])
        self.log.info("operator: muted %s until %s", key, utc(expires))
        self.reply(request)

    def handle_unmute(self, request, rest):
        key, _ = self.name_and_until(rest, "unmute NAME")
        self.lift(request, ("unmute", key), "unmuted", "not-muted")

    def lift(self, request, op, done, missing):
        """An unban or unmute; ERR ``missing`` when there was none to lift."""
        if not self.moderate([op]):
            self.reply(request, [], missing)
            return
        self.log.info("operator: %s %s", done, op[1])
        self.reply(request)

    def handle_account(self, request, rest):
        self.gate.handle_account(request, rest)

    def handle_accounts(self, request, rest):
        self.gate.handle_accounts(request, rest)

    def accounts_changed(self, accounts):
        """The gate's accounts changed: the supervisor keeps them for a
        broker that replaces this one."""
        self._report(("accounts", accounts))

    def handle_announce(self, request, rest):
        text = rest.strip()
        if not text:
            raise ValueError("usage: announce TEXT")
        self.announce(text, None)
        self.directory.control([("announce", text)])
        self.log.info("operator: announced %r", text)
        self.reply(request)

    def announce(self, text, origin):
        self.origin = origin
        self.broadcast(protocol.notice_line(text))
        self.origin = None

    @staticmethod
    def duration_and_reason(rest):
        """``[DURATION] [REASON]``: (expiry or None, reason)."""
        words = rest.split(None, 1)
        if words and moderation.looks_like_duration(words[0]):
            return time.time() + moderation.parse_duration(words[0]), \
                words[1].strip() if len(words) > 1 else ""
        return None, rest.strip()

    def name_and_until(self, rest, usage):
        words = rest.split()
        if not words or len(words) > 2 or not protocol.valid_name(words[0].encode()):
            raise ValueError("usage: " + usage)
        expires = time.time() + moderation.parse_duration(words[1]) if len(words) > 1 else None
        return words[0].lower(), expires

    def moderate(self, ops, publish=True):
        """Apply changes of the bans and mutes: saved, handed to the workers
        and the supervisor, and (``publish``) to the other nodes. True if
        anything changed."""
        changed = [op for op in ops if self.moderation.apply(op)]
        if changed:
            self.moderation_changed(changed if publish else ())
        return bool(changed)

    def moderation_changed(self, published):
        """Saved, handed to the workers and the supervisor, and the
        ``published`` changes to the other nodes."""
        self.moderation.prune(time.time())
        try:
            statefile.save_json(self.bans_path(), self.moderation.to_json())
        except OSError as exc:
            self.log.error("cannot save the bans in %s (they hold until a restart): %s",
                           self.bans_path(), exc.strerror or exc)
        for worker in self.links.values():
            worker.outbox.append((link.MODERATION, self.moderation))
        self._report(("moderation", self.moderation))
        if published:
            self.directory.control([("moderation", op) for op in published])

    def bans_path(self):
        return os.path.join(self.config.state_dir, moderation.BANS_FILE)

    # -- what the directory calls back (chatlib.directory.Router) -------------

    def local_users(self):
        return self.users

    def all_synced(self):
        return not self.unsynced

    def grant(self, slot, cid, name, stamp):
        if slot not in self.links:              # its worker died meanwhile
            self.directory.release(name.lower(), slot, cid, announce=False)
            return
        self.register(name, slot, cid, stamp)
        self.links[slot].outbox.append((link.GRANTED, cid, name, stamp))
        self.gate.logged_in(name.lower())
        self.tell_all((link.JOINED, name.lower()))

    def who_lines(self):
        if self.who_cache is None:
            self.who_cache = protocol.user_lines(user.name for user in self.users.values())
        return self.who_cache

    def latest_stamp(self):
        return self.last_stamp

    # -- cluster mode: what the node's Cluster calls back ---------------------

    def remote_lines(self, origin, blob):
        """Another node's ``MSG`` lines, from its batch ``origin``."""
        self.origin = origin
        self.broadcast(blob)
        self.origin = None

    def remote_dm(self, origin, key, line):
        """Another node's ``DM`` line for ``key``, if logged in here."""
        target = self.users.get(key)
        if target is not None:
            self.origin = origin
            self.box(target.slot).append((link.DELIVER, target.cid, line))
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

    def remote_control(self, records, number):
        """The operator's commands made on another node, from bus entry ``number``."""
        for record in records:
            kind = record[0]
            if kind == "kick":
                _, key, reason = record
                if key in self.users:
                    self.kick(key, reason)
                    self.log.info("operator, on another node: kicked %s", key)
            elif kind == "announce":
                self.announce(record[1], ("ctl", number))
            elif kind == "moderation":
                if self.moderate([record[1]], publish=False):
                    self.log.info("operator, on another node: %s %s", *record[1][:2])
            elif kind == "account":
                self.gate.remote(record[1])

    def restore_state(self, kind, ops, kept):
        """Joined: the chat's bans and mutes (``kind`` "moderation") or
        accounts ("account") as Redis holds them, or, when Redis had lost
        them (``kept``), ours, which the directory gives back to Redis."""
        if kind != "moderation":
            return self.gate.restore(ops, kept)
        if kept:
            return self.moderation.ops()
        fresh = moderation.Moderation(ops)
        if fresh.ops() != self.moderation.ops():
            self.moderation = fresh
            self.moderation_changed(())
        return None

    def tell_cursor(self, cursor):
        """The bus entries up to ``cursor`` are routed: workers learn it with
        their next batch, for a restarted broker to resume from."""
        self.cursor = cursor
        self.lazy_soon()

    def directory_changed(self):
        for worker in self.links.values():
            worker.owes_directory = True
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
        for worker in self.links.values():
            worker.outbox.append((link.LEASE, until))

    def evict(self, keys=None, drop_lines=False):
        """The node cannot vouch for its users any more: close their
        connections (``keys``: only those) with ERR unavailable. With
        ``drop_lines``, every user goes, and their lines still waiting to
        be routed go with them."""
        if drop_lines:
            self.deferred = [(slot, event) for slot, event in self.deferred
                             if event[0] != link.BROADCAST and event[0] != link.DM]
        for slot, worker in self.links.items():
            cids = None if keys is None else [
                self.users[k].cid for k in keys if k in self.users and self.users[k].slot == slot]
            if cids is None or cids:
                worker.outbox.append((link.EVICT, protocol.ERR_UNAVAILABLE, cids, UNAVAILABLE))


def main(argv=None):
    import socket
    if not hasattr(socket, "SCM_RIGHTS"):
        # Before anything else: the processes hand client sockets to one
        # another over Unix sockets (SCM_RIGHTS), which Windows lacks.
        sys.stderr.write("chat-server runs on Linux and macOS; on Windows, use WSL\n")
        return 2
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["ctl"]:
        from chatlib.control.client import main as ctl
        return ctl(args[1:])
    from chatlib.config import parse_args
    from chatlib.supervisor import Supervisor
    from worker import Worker
    return Supervisor(parse_args(args), broker=Broker, worker=Worker).run()


if __name__ == "__main__":
    sys.exit(main())
