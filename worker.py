"""The worker: one event loop running many client connections.

A worker receives accepted sockets from the acceptor, reads lines, answers
what it can alone (``PING``, syntax errors) and asks the broker for the rest
over one batched :class:`~chatlib.channel.Channel`. This file is the loop and
the routing: where each line goes, and when. The parts it drives:

* :mod:`chatlib.connection`: a client connection, its output and its write path;
* :mod:`chatlib.flood`: flood control (``--rate``, ``--burst``);
* :mod:`chatlib.intake`: new connections from the acceptor, and the notes back;
* :mod:`chatlib.tls`: TLS connections, their handshakes on this loop;
* :mod:`chatlib.link`, :mod:`chatlib.delivery`: what the broker link carries,
  and how nothing on it is lost or doubled;
* :mod:`chatlib.upgrade`: at an upgrade, every connection and its state
  handed to a worker of the new code (and TLS sessions relayed to it).

The hot path, per loop turn:

* every ``MSG`` line read this turn is formatted once (a read of nothing but
  plain ``MSG`` lines as one block) and goes two ways: into one batch for
  the broker (which passes it to the other workers) and into one local
  fan-out, where every local user gets the same prepared bytes (a sender's
  copy leaves out its own lines);
* everything owed to a socket is written with one ``send``/``sendmsg`` at the
  end of the turn (scatter-gather: no join, no per-recipient copy), broadcast
  lines at most every BROADCAST_EVERY under load;
* the broker's ``MSG`` blobs are fanned out the same way.

A client that has asked the broker something (``LOGIN``, ``WHO``, ``DM``,
``REGISTER``, ``PASSWORD``) has its later lines held until the answer comes,
which keeps its answers in the order of its commands; a client with held
lines is not read any further, so a worker holds at most one read's worth of
unprocessed input per client.
"""

import socket
import time
from collections import Counter
from multiprocessing.connection import Connection

from chatlib import link, logs, protocol
from chatlib.channel import Channel
from chatlib.connection import READ, WRITE, Client
from chatlib.control.users import UserRow
from chatlib.delivery import BrokerLink
from chatlib.flood import FloodControl
from chatlib.handoff import TLS
from chatlib.intake import Intake
from chatlib.metrics import BROADCAST_BOUNDS, Histogram
from chatlib.moderation import Moderation
from chatlib.protocol import (TOO_LONG, Dm, Hangup, Login, Msg, Password, Ping, Quit,
                              Register, Reply, Who, parse_line)
from chatlib.service import Service
from chatlib.stats import COUNTERS
from chatlib.telnet import Answer, Interrupt
from chatlib.upgrade import handover, state

RECV_SIZE = 65536
CID_STRIDE = 1 << 20       # connection ids: a count, times this, plus the worker's slot
PAUSED_POLL = 0.005        # while the broker link is congested, look again this often
OUTBOX_LIMIT = 10000       # events kept for the broker while there is none
LINGER = 2.0               # seconds a cut connection may take to drain its last line
BROADCAST_EVERY = 0.005    # under load, broadcast lines are written at most this often
QUIT_REASON = "quit"
HANGUP_REASON = "not a chat client"
INTERRUPT_REASON = "interrupt (telnet's Ctrl-C)"
ENDED_BY_CLIENT = (QUIT_REASON, HANGUP_REASON, INTERRUPT_REASON)   # lines after: not run
KICKED_REASON = "kicked"
BANNED_REASON = "banned"
# Why a connection ended, as the log says it -> as the metrics count it
# (chat_disconnections_total); anything else is a connection error.
DISCONNECT_LABELS = {
    QUIT_REASON: "quit", "closed by client": "closed", HANGUP_REASON: "not-a-chat-client",
    INTERRUPT_REASON: "interrupt", "idle timeout": "idle-timeout",
    "login timeout": "login-timeout", "slow consumer": "slow-consumer", "flood": "flood",
    "server shutdown": "shutdown", "cluster unavailable": "unavailable",
    KICKED_REASON: "kicked", BANNED_REASON: "banned"}


class Worker(Service):
    role = "worker"

    def __init__(self, config, pipes, slot):
        super().__init__(config, pipes, slot)
        self.intake = None         # chatlib.intake.Intake: its pipes come with an order
        self.clients = {}          # cid -> Client
        self.users = {}            # cid -> Client, the logged-in ones
        self.local_names = {}      # lower-case name -> Client, the same by name
        self.directory = {}        # lower-case name -> name as typed (None for
                                   # another node's user), logged in anywhere:
                                   # a replica the broker keeps up to date
        self.dirty = set()         # clients with output to write this turn
        self.broadcast_due = False # the users have broadcast lines to write
        self.next_broadcast = 0.0  # not before then (BROADCAST_EVERY)
        self.broker = BrokerLink(OUTBOX_LIMIT)   # its channel comes with an order
        # Cluster mode: the node's lease holds until then (link.LEASE); past
        # it, users' lines wait in `unvouched` until a later one, or their close.
        self.vouched_until = 0.0 if config.redis is not None else float("inf")
        self.unvouched = set()
        self.msg_run = []          # MSG lines not yet closed into an event
        self.local = []            # (sender, lines) for this turn's local fan-out
        self.stalled = set()       # clients holding lines until the link drains
        self.flood = FloodControl(config.rate, config.burst) if config.rate else None  # --rate 0: none
        self.counters = dict.fromkeys(COUNTERS, 0)   # for --stats-interval
        self.logins = Counter()        # LOGINs by result, and connections closed
        self.disconnects = Counter()   # by reason (DISCONNECT_LABELS): for the metrics
        self.broadcast_seconds = Histogram(BROADCAST_BOUNDS)
        self.first_unwritten = None    # when the oldest MSG not yet written was read
        self.moderation = Moderation()  # the chat's bans and mutes (link.MODERATION)
        self.mutes = False         # any mute at all: the hot path looks no further
        self.next_cid = 1
        self.now = time.monotonic()
        self.next_sweep = self.now
        self.stopping = False
        self.lingering = {}        # Client -> when to close it, cut but draining
        self.tls = None            # chatlib.tls.TlsServer, with --tls-cert
        self.pausing = False       # an upgrade: the acceptor leaving, then the broker
        self.quiet = False         # ...the acceptor gone, no TLS handshake under way
        self.drained = False       # ...the broker gone too: ready to hand over
        self.relay = None          # chatlib.upgrade.relay.TlsRelay, after the hand-over

    # -- set-up and control ---------------------------------------------------

    def start(self):
        cfg = self.config
        self.intake = Intake(self.sel, self.on_connection, self.log)
        shortest = min(cfg.idle_timeout, cfg.login_timeout or cfg.idle_timeout)
        if cfg.tls_cert:
            from chatlib.tls import TlsServer     # OpenSSL is loaded only if used
            self.tls = TlsServer(cfg, self.sel, self.tls_ready, self.tls_failed, self.log)
            shortest = min(shortest, cfg.tls_handshake_timeout)
        self.sweep_every = min(1.0, max(0.05, shortest / 4))

    def attach_link(self, conn):
        """Reach the broker over ``conn``; tell it who is here and what we await.

        A restarted broker learns our users from SYNC, gets again the
        requests its predecessor never answered, and the MSG, DM and BYE
        events it never acknowledged, each under its batch's old number, so
        that receivers drop what they already had. Users whose BYE is among
        them are in the SYNC too, so that the new broker announces them.
        So are the other users of this node our directory lists (another
        node's have no name here), and the names our LOGINs claim again: a
        new broker announces to us those it finds nowhere, whose worker
        died with the old broker.
        """
        queued = {id(event) for event in self.broker.outbox}
        requests = [c.request for c in self.clients.values()
                    if c.waiting and id(c.request) not in queued]
        users = [(c.cid, c.name, c.login_stamp) for c in self.users.values()]
        departed = [e[1:] for e in self.broker.unsent() if e[0] == link.BYE and e[2] is not None]
        listed = {key: name for key, name in self.directory.items()
                  if name is not None and key not in self.local_names}
        claims = [r[2].lower() for r in requests if r[0] == link.LOGIN]
        sync = (link.SYNC, users, departed, self.broker.cursor, listed, claims)
        self.broker.attach(Channel(conn, self.sel, self.on_batches, self.on_link_lost),
                           sync, requests)

    def on_link_lost(self):
        self.log.debug("broker link lost; holding requests until a new broker")
        self.broker.lost()

    def congested(self):
        """True while the broker cannot take more from us: hold client lines."""
        return self.broker.congested()

    def on_order(self, order):
        if order[0] == "link":            # a broker: here is our end
            self.attach_link(Connection(self.received_fd()))
        elif order[0] == "handoff":       # an acceptor: here are our ends
            handoff, notes = self.received_fd(), self.received_fd()
            ips = [c.ip for c in self.clients.values()]
            if self.tls is not None:
                ips += [hs.ip for hs in self.tls.pending]       # handshakes too
            self.intake.attach(handoff, notes, ips)
        elif order[0] == "users":         # the operator's `users`
            self._report(("answer", order[1], self.user_rows()))
        elif order[0] == "tls-reload":    # SIGHUP: the certificate may be new
            if self.tls is not None and self.tls.reload():
                self.log.debug("TLS certificate reloaded")
        elif order[0] == "pause":         # an upgrade (chatlib.upgrade)
            self.pause()
        elif order[0] == "export":        # ...our connections, to our successor
            self.export(self.received_socket())
        elif order[0] == "adopt":         # ...a predecessor's connections
            self.adopt(self.received_socket())
        else:
            super().on_order(order)

    def heartbeat_info(self):
        info = dict(self.counters)
        if self.broker.channel is not None:
            info["batches"] = self.broker.channel.frames_out
        info.update(clients=len(self.clients), users=len(self.users),
                    logins=dict(self.logins), disconnects=dict(self.disconnects),
                    broadcast_seconds=self.broadcast_seconds.state())
        if self.tls is not None:
            info.update(self.tls.figures())
        if self.relay is not None:
            info["relayed"] = len(self.relay)
        return info

    def poll_timeout(self):
        if self.relay is not None:         # all it does, its selector wakes it for
            return self.heartbeat_interval
        if self.stalled:
            return PAUSED_POLL
        until = self.next_sweep if self.flood is None else min(self.next_sweep,
                                                               self.flood.next_due())
        if self.broadcast_due:
            until = min(until, self.next_broadcast)
        return max(0.0, min(self.heartbeat_interval, until - time.monotonic()))

    def stop(self):
        """Shutdown: every client gets ``ERR server-shutdown``, then we exit."""
        self.stopping = True
        if self.relay is not None:
            self.relay.close_all()
        if self.tls is not None:
            self.tls.close_all()
        for c in list(self.clients.values()):
            self.cut(c, protocol.ERR_SERVER_SHUTDOWN, "server shutdown")
        self.running = False

    def finish(self):
        if self.broker.channel is not None:
            self.broker.channel.flush_blocking(1.0)

    # -- the loop -------------------------------------------------------------

    def on_events(self, events):
        self.now = time.monotonic()
        for key, mask in events:
            c = key.data
            if type(c) is not Client:
                c(mask)
            else:
                if mask & READ and c.sock is not None:
                    self.on_readable(c)
                if mask & WRITE and c.sock is not None:
                    self.flush(c, True)
        self.end_turn()

    def tick(self, now):
        self.now = now
        if self.broadcast_due and now >= self.next_broadcast:
            self.end_turn()
        if self.relay is not None and not self.relay:
            self.running = False           # the last relayed TLS user has left
        if self.stalled and not self.congested():
            waiting, self.stalled = self.stalled, set()
            self.resume(waiting)
            self.end_turn()
        if self.flood is not None and self.flood.next_due() <= now:
            for cid in self.flood.due(now):
                c = self.clients.get(cid)
                if c is not None and c.held:
                    self.pump(c)
            self.end_turn()
        if self.pausing and not self.drained:
            self.check_drained()
        if now >= self.next_sweep:
            self.next_sweep = now + self.sweep_every
            self.sweep_idle(now)

    def end_turn(self):
        """Fan out this turn's MSG lines, write each socket that is due once,
        send the broker one batch.

        Broadcast lines wait until BROADCAST_EVERY has passed since the last
        broadcast write. Each write costs a system call and a pass through the
        TCP stack, and under a flood a worker woken by every batch would write
        every user many times a millisecond: waiting makes the writes fewer
        and larger, so the same CPU delivers more. The wait is short enough
        that at a moderate rate the latency does not move. A lone message
        finds the last write long past and goes at once; a DM or an answer
        never waits, and takes the broadcast lines queued before it along.
        (Figures: docs/BENCHMARKS.md, "The flood parsed a read at a time;
        broadcast writes every 5 ms".)
        """
        if self.local:
            self.fan_out_local()
        written = None                 # since when the MSG lines written now wait
        if self.broadcast_due and self.now >= self.next_broadcast:
            self.broadcast_due = False
            self.next_broadcast = self.now + BROADCAST_EVERY
            self.dirty.update(self.users.values())
            written, self.first_unwritten = self.first_unwritten, None
        while self.dirty:
            dirty, self.dirty = self.dirty, set()
            for c in dirty:
                if c.sock is not None:
                    self.flush(c, False)
        if written is not None:
            self.broadcast_seconds.observe(time.monotonic() - written)
        if self.msg_run:
            self.close_msg_run()
        self.counters["events"] += self.broker.flush()
        self.intake.send_notes()

    def sweep_idle(self, now):
        """One pass over all connections instead of a timer per connection."""
        deadline = now - self.config.idle_timeout
        login_deadline = now - (self.config.login_timeout or float("inf"))
        for c, until in list(self.lingering.items()):
            if until <= now:
                self.drop(c, c.closing)
        for c in list(self.clients.values()):
            # Idle: all its lines run (none held, no answer awaited), the
            # last of them before the deadline.
            if c.last_line < deadline and c.held is None and not c.waiting:
                self.cut(c, protocol.ERR_IDLE_TIMEOUT, "idle timeout")
            elif c.name is None and c.connected < login_deadline and not c.waiting:
                self.cut(c, protocol.ERR_LOGIN_TIMEOUT, "login timeout")
        if self.tls is not None and self.tls.pending:
            self.tls.sweep(now)
        self.end_turn()

    # -- new connections ------------------------------------------------------

    def on_connection(self, sock, ip, kind):
        """A connection from the acceptor (chatlib.intake): a client, or on
        the TLS port a handshake on our selector first (chatlib.tls)."""
        if kind == TLS:
            self.tls.accept(sock, ip, self.now)
            return
        c = self.new_client(sock, ip, self.now)
        # A client's first line is usually here already (it was sent as soon
        # as the connection was up): reading now saves this client a loop
        # turn, and costs one failed recv if not.
        self.on_readable(c)

    def new_client(self, sock, ip, since):
        # Unique across workers, so that connections moved from several
        # workers into one (an upgrade to fewer workers) keep theirs.
        cid, self.next_cid = self.next_cid * CID_STRIDE + self.slot, self.next_cid + 1
        c = Client(sock, cid, ip, self.config.max_line, since, self.config.burst)
        self.clients[cid] = c
        c.watch(self.sel, 0)
        return c

    def tls_ready(self, handshake, stream):
        """Handshake done: from now on a client like any other, whose socket
        is the TLS stream. Its timeouts count from the hand-off."""
        c = self.new_client(stream, handshake.ip, handshake.since)
        self.on_readable(c)        # lines may have come with the handshake

    def tls_failed(self, handshake):
        """Gone without a session (closed already): the acceptor frees its slot."""
        self.intake.gone(handshake.ip)

    # -- reading and running lines --------------------------------------------

    def on_readable(self, c):
        try:
            data = c.sock.recv(RECV_SIZE)
            self.counters["bytes_in"] += len(data)
            c.bytes_in += len(data)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.drop(c, "connection error: %s" % (exc.strerror or exc))
            return
        if not data:
            # Half-close: finish what it sent, deliver the answers, then close.
            c.closing = c.closing or "closed by client"
            c.update_interest(self.sel)
            self.dirty.add(c)
            return
        if c.name is None and not c.reader.buffered and protocol.looks_like_tls(data):
            # A line that starts like a TLS ClientHello: a client at the
            # wrong port. Told before the line reader sees its bytes, whose
            # 0xff bytes it would take for telnet's commands.
            self.owe(c, protocol.ERR_NOT_A_CHAT_CLIENT)
            c.closing = HANGUP_REASON
            c.update_interest(self.sel)
            return
        lines = c.reader.feed(data)
        if lines:
            if c.held is None:
                c.held = lines
            else:
                c.held.extend(lines)
            self.pump(c, fresh=True)

    def pump(self, c, fresh=False):
        """Run ``c``'s unrun lines as far as nothing stops them.

        Four things hold lines back: an unanswered broker request (the answer
        pumps again), a congested broker link (``tick`` pumps again), flood
        control (``tick`` pumps again when tokens are back), and in cluster
        mode a lease past its time (a later LEASE pumps again). A client
        with held lines is not read, so one read's worth is all it can park.
        A flooder stops counting as one only when a ``fresh`` read's lines
        all run at once: running out of held lines is not enough, since the
        next read is already waiting in the kernel.

        The idle clock restarts whenever the server turns to a client's
        lines, not only when it reads them: neither a flooder slowed by
        flood control nor a client waiting for the broker is idle while its
        lines wait (``sweep_idle`` skips them).
        """
        c.last_line = self.now
        lines, c.held = c.held, None
        flood = self.flood
        if c.waiting or self.congested():
            rest = lines
        elif self.now >= self.vouched_until and c.name is not None:
            rest = lines
            self.unvouched.add(c)
        elif flood is not None:
            allowed = flood.allowance(c, self.now)
            rest = self.run_lines(c, lines[:allowed])
            flood.spend(c, min(allowed, len(lines)) - (len(rest) if rest else 0))
            if len(lines) > allowed and c.closing not in ENDED_BY_CLIENT:
                rest = (rest or []) + lines[allowed:]
        else:
            rest = self.run_lines(c, lines)
        if rest:
            c.held = rest
            if c.waiting or c in self.unvouched:
                pass
            elif self.congested():
                self.stalled.add(c)
            elif not flood.throttle(c, self.now):    # over the rate for too long
                self.counters["flood_cuts"] += 1
                self.cut(c, protocol.ERR_FLOOD, "flood")
        elif fresh and flood is not None:
            flood.caught_up(c)
        if c.sock is not None:
            c.update_interest(self.sel)

    def run_lines(self, c, lines):
        """Run lines in order until one needs the broker; return the rest."""
        muted = self.mutes and c.name is not None and self.moderation.muted(
            c.name.lower(), time.time())
        if c.name is not None and len(lines) > 1 and not muted:
            block = protocol.msg_block(lines, c.name_b)
            if block is not None:          # the flood's fast path: all MSGs
                self.queue_msgs(c, block, len(lines))
                return None
        for i, line in enumerate(lines):
            if type(line) is bytes:
                cmd = parse_line(line, c.name is not None)
                if cmd is None:
                    continue
            elif line is TOO_LONG:
                self.owe(c, protocol.ERR_LINE_TOO_LONG)
                continue
            else:
                cmd = line             # telnet's, from the reader (chatlib.telnet)
            kind = type(cmd)
            if muted and (kind is Msg or kind is Dm):
                self.owe(c, protocol.ERR_MUTED)    # reaches nobody
            elif kind is Msg:
                self.queue_msgs(c, protocol.msg_line(c.name_b, cmd.text), 1)
            elif kind is Reply:
                if cmd.data is protocol.ERR_INVALID_USERNAME:
                    self.logins["invalid-username"] += 1
                self.owe(c, cmd.data)
            elif kind is Ping:
                self.owe(c, protocol.PONG)
            elif kind is Quit or kind is Hangup:
                if kind is Hangup:
                    self.owe(c, cmd.data)
                c.closing = QUIT_REASON if kind is Quit else HANGUP_REASON
                self.dirty.add(c)
                return None            # lines after QUIT are not run
            elif kind is Dm and self.send_dm(c, cmd):
                continue
            elif kind is Login and self.moderation and self.moderation.banned_name(
                    cmd.name.lower(), time.time()):
                self.logins["banned"] += 1
                self.owe(c, protocol.ERR_BANNED)
                c.closing = BANNED_REASON
                self.dirty.add(c)
                return None
            elif kind is Answer:
                self.owe(c, cmd.data)
            elif kind is Interrupt:
                # Ctrl-C: the end, as QUIT. Telnet follows it with DO
                # TIMING-MARK and shows nothing until that is answered.
                for later in lines[i + 1:]:
                    if type(later) is Answer:
                        self.owe(c, later.data)
                c.closing = INTERRUPT_REASON
                self.dirty.add(c)
                return None
            else:
                self.ask_broker(c, cmd)
                return lines[i + 1:]
        return None

    def queue_msgs(self, c, lines, count):
        """``count`` ready-made MSG lines from ``c``: for the local users at
        the end of the turn, and for the broker's batch."""
        self.local.append((c, lines))
        self.msg_run.append(lines)
        self.counters["msgs"] += count
        if self.first_unwritten is None:
            self.first_unwritten = self.now

    def send_dm(self, c, cmd):
        """The DM fast path; False when the broker must be asked and waited for.

        A target on this worker gets the line at once (after this turn's
        pending MSG lines, to keep the sender's order). A target the directory
        knows elsewhere gets it through the broker with no answer awaited: the
        sender is not held, and nothing travels back. Only a name the
        directory does not know costs a round trip, for ``ERR user-not-found``.
        """
        key = cmd.target.lower()
        target = self.local_names.get(key)
        if target is not None:
            if self.local:
                self.fan_out_local()
            self.owe(target, protocol.dm_line(c.name_b, cmd.text))
            self.counters["deliveries"] += 1
            return True
        if key in self.directory:
            self.to_broker((link.DM, c.cid, key, protocol.dm_line(c.name_b, cmd.text), False))
            return True
        return False

    def ask_broker(self, c, cmd):
        kind = type(cmd)
        if kind is Login:
            request = (link.LOGIN, c.cid, cmd.name, self.peer(c), cmd.password)
        elif kind is Register or kind is Password:
            request = (link.REGISTER if kind is Register else link.PASSWORD, c.cid,
                       cmd.password, over_tls(c))
        elif kind is Who:
            request = (link.WHO, c.cid)
        elif kind is Dm:
            request = (link.DM, c.cid, cmd.target.lower(),
                       protocol.dm_line(c.name_b, cmd.text), True)
        else:
            raise TypeError(cmd)
        c.waiting = True
        c.request = request
        self.to_broker(request)

    def to_broker(self, event):
        if self.msg_run:
            self.close_msg_run()
        self.broker.outbox.append(event)

    def close_msg_run(self):
        run, self.msg_run = self.msg_run, []
        self.broker.outbox.append((link.BROADCAST, b"".join(run)))

    # -- the upgrade (chatlib.upgrade) ----------------------------------------

    def pause(self):
        """An upgrade begins: the acceptor is leaving. Once its pipe is closed
        (every connection it sent us is here) and no TLS handshake is under
        way (a handshake cannot move; the usual timeout bounds it), we are
        quiet. Then the broker retires: once its link is closed, everything
        it routed to us is in our clients' output and what it acknowledged
        of ours is known: drained. The clients are served all along; their
        lines for other workers wait for the new broker, as when a broker
        restarts."""
        self.pausing = True
        self.check_drained()

    def check_drained(self):
        if not self.quiet and self.intake.handoff is None and not (
                self.tls is not None and self.tls.pending):
            self.quiet = True
            self._report(("quiet",))
        if self.quiet and self.broker.channel is None:
            self.drained = True
            self._report(("drained",))

    def export(self, pipe):
        """Hand every connection to our successor over ``pipe``, with its
        state (chatlib.upgrade.state); then leave, or stay as the relay of
        the TLS ones (chatlib.upgrade.relay)."""
        self.end_turn()                # this turn's lines: fanned out here, queued for the broker
        pipe.setblocking(True)
        connections, relayed, moved = [], [], []
        for c in self.clients.values():
            c.leave(self.sel)
            relayed_port = None
            if not isinstance(c.sock, socket.socket):   # a TLS stream
                relayed_port = self.peer(c)[1]
                c.consume(c.sock.covered)      # encrypted already: the relay sends it
                c.sock.covered = 0
                ours, theirs = socket.socketpair()
                relayed.append((c, ours))
                moved.append(theirs)
                fd = theirs.fileno()
            else:
                moved.append(c.sock)
                fd = c.sock.fileno()
            connections.append((state.record(c, relayed_port), fd))
        header = {"version": state.VERSION, "events": self.broker.unrouted(),
                  "cursor": self.broker.cursor, "routed": self.broker.routed.seen,
                  "directory": self.directory, "moderation": self.moderation,
                  "figures": self.figures_so_far()}
        try:
            handover.send(pipe, header, connections)
        except OSError as exc:
            self.log.error("upgrade: hand-over failed: %s", exc.strerror or exc)
        pipe.close()
        for sock in moved:
            sock.close()
        for c in list(self.lingering):
            c.close(self.sel)
        self.clients, self.users, self.local_names, self.lingering = {}, {}, {}, {}
        self.dirty, self.stalled, self.unvouched = set(), set(), set()
        self.log.info("upgrade: connections handed over: %d%s", len(connections),
                      " (%d over TLS, relayed from here)" % len(relayed) if relayed else "")
        if relayed:
            from chatlib.upgrade.relay import TlsRelay   # OpenSSL: only where TLS is
            logs.set_process_title("chat-tls-relay")
            self.relay = TlsRelay(self.sel, relayed)
            self._report(("relaying", len(relayed)))
        else:
            self.running = False

    def adopt(self, pipe):
        """A predecessor's connections, over ``pipe``: they carry on here
        as they were; its events the old broker never routed go to the new."""
        pipe.setblocking(True)
        try:
            header, connections = handover.receive(pipe)
        except (OSError, EOFError) as exc:
            self.log.error("upgrade: hand-over failed: %s", exc)
            self._report(("adopted", 0, 0))
            return
        finally:
            pipe.close()
        if header["version"] not in state.READS:    # the probe checked: never seen
            self.log.error("upgrade: state version %r is not one this code reads %r",
                           header["version"], state.READS)
            for _, fd in connections:
                socket.close(fd)
            self._report(("adopted", 0, 0))
            return
        self.broker.outbox.extend(header["events"])
        self.broker.cursor = header["cursor"] or self.broker.cursor
        self.broker.routed.merge(header["routed"])
        self.directory.update(header["directory"])
        self.moderation = header["moderation"]
        self.mutes = self.moderation.has_mutes
        self.add_figures(header["figures"])
        self.now = time.monotonic()
        for fields, fd in connections:
            c = state.client(fields, socket.socket(fileno=fd), self.config.max_line,
                             self.config.burst)
            c.sock.setblocking(False)
            self.next_cid = max(self.next_cid, c.cid // CID_STRIDE + 1)
            self.clients[c.cid] = c
            if c.name is not None:
                self.users[c.cid] = c
                self.local_names[c.name.lower()] = c
            if c.out:
                self.dirty.add(c)
            c.watch(self.sel, WRITE if c.out else 0)
        for c in list(self.clients.values()):
            if c.held and not c.waiting and c.sock is not None:
                self.pump(c)
        self.end_turn()
        self.report_heartbeat(time.monotonic())    # the figures, predecessors' included
        self._report(("adopted", len(connections),
                      sum(1 for fields, _ in connections if fields["relayed_port"] is not None)))

    def figures_so_far(self):
        """What this worker counted, for its successor to count on from:
        the server's totals do not go back at an upgrade."""
        return {"counters": self.counters, "logins": dict(self.logins),
                "disconnects": dict(self.disconnects),
                "broadcast_seconds": self.broadcast_seconds.state(),
                "tls": self.tls.figures() if self.tls is not None else {}}

    def add_figures(self, figures):
        for key, count in figures["counters"].items():
            if key in self.counters:
                self.counters[key] += count
        self.logins.update(figures["logins"])
        self.disconnects.update(figures["disconnects"])
        self.broadcast_seconds.add(figures["broadcast_seconds"])
        if self.tls is not None:
            self.tls.completed += figures["tls"].get("tls_handshakes", 0)
            self.tls.failed += figures["tls"].get("tls_failed", 0)

    # -- what the broker sends ------------------------------------------------

    def on_batches(self, batches):
        for batch in batches:
            seen_before = False    # the lines that follow were routed to us already
            for event in batch:
                tag = event[0]
                if tag == link.BROADCAST:
                    if not seen_before:
                        self.fan_out(event[1])
                elif tag == link.FROM:
                    _, origin, number = event
                    seen_before = not self.broker.routed.is_new(origin, number)
                elif tag == link.DELIVER:
                    _, cid, line = event
                    c = self.users.get(cid)
                    if c is not None and not seen_before:
                        self.owe(c, line)
                        self.counters["deliveries"] += 1
                elif tag == link.ANSWER:
                    _, cid, data = event
                    c = self.clients.get(cid)
                    if c is not None and c.waiting:
                        if c.request[0] == link.LOGIN:
                            self.logins[data[4:-1].decode()] += 1   # "ERR <result>\n"
                            if data == protocol.ERR_BANNED:         # then closed
                                c.closing = BANNED_REASON
                                c.held = None
                        if data:
                            self.owe(c, data)
                        self.answered(c)
                elif tag == link.ACK:
                    self.broker.sent.acknowledged(event[1])
                elif tag == link.JOINED:
                    _, key, name = event
                    self.directory[key] = name
                elif tag == link.LEFT:
                    self.directory.pop(event[1], None)
                elif tag == link.DIRECTORY:
                    self.directory = dict(event[1])
                elif tag == link.CURSOR:
                    self.broker.cursor = event[1]
                elif tag == link.LEASE:
                    self.vouched(event[1])
                elif tag == link.EVICT:
                    _, line, cids, reason = event
                    for cid in list(self.users) if cids is None else cids:
                        c = self.users.get(cid)
                        if c is not None:
                            self.cut(c, line, reason)
                elif tag == link.MODERATION:
                    self.moderate(event[1])
                elif tag == link.GRANTED:
                    _, cid, name, stamp = event
                    c = self.clients.get(cid)
                    if c is not None and c.waiting:
                        self.logged_in(c, name, stamp)

    def logged_in(self, c, name, stamp):
        c.name = name
        c.name_b = name.encode()
        c.login_stamp = stamp
        c.logged_in_at = time.time()
        self.logins["ok"] += 1
        self.users[c.cid] = c
        self.local_names[name.lower()] = c
        self.owe(c, protocol.OK)
        self.log.info("%s logged in from %s", name, c.ip)
        self.answered(c)

    def moderate(self, moderation):
        """The chat's bans and mutes changed: whoever a ban now matches goes,
        logged in or not."""
        self.moderation = moderation
        self.mutes = moderation.has_mutes
        now = time.time()
        for c in list(self.clients.values()):
            if (c.name is not None and moderation.banned_name(c.name.lower(), now)) \
                    or moderation.banned_address(c.ip, now):
                self.cut(c, protocol.ERR_BANNED, BANNED_REASON)

    def user_rows(self):
        """This worker's users, for the operator's ``users``."""
        return [UserRow(c.login_stamp, c.name, None, *self.peer(c), c.logged_in_at,
                        self.now - c.last_line, c.bytes_in, c.bytes_out, c.out_bytes)
                for c in self.users.values()]

    @staticmethod
    def peer(c):
        """(address, port, TLS or not), for the operator; the port costs a
        system call, made only when asked (a LOGIN, the operator's ``users``)."""
        if c.relayed_port is not None:
            return c.ip, c.relayed_port, True
        tls = over_tls(c)
        try:
            port = (c.sock.sock if tls else c.sock).getpeername()[1]
        except OSError:
            port = 0
        return c.ip, port, tls

    def vouched(self, until):
        """Cluster mode: the node's lease holds until ``until``; users'
        lines held past the last time run again if it is later."""
        self.vouched_until = until
        self.now = time.monotonic()
        if self.unvouched and self.now < until:
            waiting, self.unvouched = self.unvouched, set()
            self.resume(waiting)

    def resume(self, clients):
        """Run the held lines of ``clients`` that are still connected."""
        for c in clients:
            if c.sock is not None and c.held:
                self.pump(c)

    def answered(self, c):
        c.last_line = self.now       # the idle clock restarts (see pump)
        c.waiting = False
        c.request = None
        self.dirty.add(c)
        if c.held is not None:
            self.pump(c)

    # -- writing --------------------------------------------------------------

    def owe(self, c, data):
        """Queue ``data`` for ``c``: written at the end of the turn (flush)."""
        c.out.append(data)
        c.out_bytes += len(data)
        self.dirty.add(c)

    def fan_out(self, blob):
        """Queue the same bytes for every logged-in user of this worker."""
        n = len(blob)
        for c in self.users.values():
            c.out.append(blob)
            c.out_bytes += n
        self.broadcast_due = True
        self.counters["deliveries"] += blob.count(b"\n") * len(self.users)

    def fan_out_local(self):
        """This turn's MSG lines to the local users, each sender's own left out.

        Everyone shares one blob; only the (few) senders get a copy of their
        own, without their lines.
        """
        local, self.local = self.local, []
        senders = {sender for sender, _ in local}
        blob = b"".join([lines for _, lines in local])
        for c in self.users.values():
            if c in senders:
                data = b"".join([lines for s, lines in local if s is not c])
                if not data:
                    continue
            else:
                data = blob
            c.out.append(data)
            c.out_bytes += len(data)
        self.broadcast_due = True
        self.counters["deliveries"] += blob.count(b"\n") * (len(self.users) - 1)

    def flush(self, c, writable):
        """Write what ``c`` is owed (one system call), then apply the limits."""
        try:
            sent = c.write(writable)
        except OSError as exc:
            self.drop(c, "connection error: %s" % (exc.strerror or exc))
            return
        if sent:
            self.counters["bytes_out"] += sent
            c.bytes_out += sent
        if c.out_bytes > self.config.max_pending:
            self.counters["slow_cuts"] += 1
            self.cut(c, protocol.ERR_SLOW_CONSUMER, "slow consumer")
            return
        if c.closing and not c.out and not c.waiting and not c.held:
            self.drop(c, c.closing)
            return
        # Output left over means the socket is full: wait until it is writable.
        c.watch(self.sel, WRITE if c.out else 0)

    # -- closing --------------------------------------------------------------

    def cut(self, c, line, reason):
        """Stop serving ``c`` with a last ``line``, then close it.

        The user is gone at once (the others get its INFO now). What its
        socket cannot take at once -- a slow consumer's is full -- is cut to
        the line in flight and ``line``, and gets LINGER seconds to drain.
        """
        if c.last_words(line):
            self.drop(c, reason)
            return
        self.forget(c, reason)
        c.closing = reason
        c.watch(self.sel, WRITE)
        self.lingering[c] = self.now + LINGER

    def drop(self, c, reason):
        """Close the connection and forget it; the broker announces the user."""
        self.forget(c, reason)
        self.lingering.pop(c, None)
        c.close(self.sel)

    def forget(self, c, reason):
        """Take ``c`` out of service (once): no more lines in or out but its last."""
        if self.clients.pop(c.cid, None) is None:
            return
        self.stalled.discard(c)
        self.unvouched.discard(c)
        c.held = None
        if c.name is not None:
            self.local_names.pop(c.name.lower(), None)
        if self.users.pop(c.cid, None) is not None or c.waiting:
            if not self.stopping:
                self.to_broker((link.BYE, c.cid, c.name, c.login_stamp))
        c.waiting = False
        self.intake.gone(c.ip)
        self.disconnects[DISCONNECT_LABELS.get(reason, "error")] += 1
        if c.name is not None:
            self.log.info("%s disconnected (%s)", c.name, reason)
        else:
            self.log.debug("%s disconnected before login (%s)", c.ip, reason)


def over_tls(c):
    """Is ``c`` a TLS connection? Its socket is then a chatlib.tls.TlsStream,
    or a socket pair to the old worker that relays it (chatlib.upgrade)."""
    return c.relayed_port is not None or not isinstance(c.sock, socket.socket)
