"""The worker: one event loop running many client connections.

A worker receives accepted sockets from the acceptor (``recv_handle``), reads
lines, answers what it can alone (``PING``, syntax errors) and asks the broker
for the rest over one batched :class:`~chatlib.channel.Channel`.

The hot path, per loop turn:

* every ``MSG`` line read this turn is formatted once and goes two ways: into
  one batch for the broker (which passes it to the other workers) and into
  one local fan-out, where every local user gets the same prepared bytes
  (a sender's copy leaves out its own lines);
* everything owed to a socket is written with one ``send``/``sendmsg`` at the
  end of the turn (scatter-gather: no join, no per-recipient copy);
* the broker's ``MSG`` blobs are fanned out the same way.

A client that has asked the broker something (``LOGIN``, ``WHO``, ``DM``) has
its later lines held until the answer comes, which keeps its answers in the
order of its commands; a client with held lines is not read any further, so a
worker holds at most one read's worth of unprocessed input per client.
"""

import selectors
import socket
import time
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle

from chatlib import link, protocol
from chatlib.channel import Channel
from chatlib.protocol import (TOO_LONG, Dm, LineReader, Login, Msg, Ping,
                              Quit, Reply, Who, parse_line)
from chatlib.service import Service

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE
RECV_SIZE = 65536
IOV_MAX = 512              # buffers per sendmsg; POSIX guarantees 16, Linux/macOS 1024
HANDOFFS_PER_TURN = 256    # new sockets taken per turn, so clients are not starved
PAUSED_POLL = 0.005        # while the broker link is congested, look again this often
OUTBOX_LIMIT = 10000       # events kept for the broker while there is none


class Client:
    """One connection. Kept small: twenty thousand of these must fit."""

    __slots__ = ("sock", "cid", "peer", "name", "name_b", "login_stamp", "reader", "out",
                 "out_bytes", "midline", "last_line", "held", "waiting",
                 "request", "closing", "interest")

    def __init__(self, sock, cid, peer, max_line, now):
        self.sock = sock
        self.cid = cid
        self.peer = peer
        self.name = None           # str once logged in
        self.name_b = None         # the same, as bytes, for formatting lines
        self.login_stamp = 0       # when the broker granted the name (WHO order)
        self.reader = LineReader(max_line)
        self.out = []              # bytes owed to the socket, in order
        self.out_bytes = 0
        self.midline = False       # out[0] starts in the middle of a line
        self.last_line = now       # for the idle timeout
        self.held = None           # lines read but not yet run
        self.waiting = False       # a request to the broker is unanswered
        self.request = None        # that request, to resend to a new broker
        self.closing = None        # why we stop reading it (QUIT, EOF)
        self.interest = 0          # selector events registered


class Worker(Service):
    role = "worker"

    def __init__(self, config, ctrl, slot, board):
        super().__init__(config, ctrl, slot)
        self.board = board
        self.handoff = None        # Connection from the acceptor (an order brings it)
        self.link = None           # Channel to the broker (an order brings it)
        self.clients = {}          # cid -> Client
        self.users = {}            # cid -> Client, the logged-in ones
        self.dirty = set()         # clients with output queued this turn
        self.outbox = []           # events for the broker this turn
        self.msg_run = []          # MSG lines not yet closed into an event
        self.local = []            # (sender, line) for this turn's local fan-out
        self.held = set()          # clients holding lines until the link drains
        self.next_cid = 1
        self.now = time.monotonic()
        self.next_sweep = self.now
        self.stopping = False

    # -- set-up and control ---------------------------------------------------

    def start(self):
        self.board.live[self.slot] = 0          # a replacement starts empty
        cfg = self.config
        self.sweep_every = min(1.0, max(0.05, cfg.idle_timeout / 4))

    def attach_link(self, conn):
        """Reach the broker over ``conn``; tell it who is here and what we await.

        A restarted broker learns our users from SYNC, and gets again the
        requests its predecessor never answered.
        """
        if self.link is not None:
            self.link.close()
        self.link = Channel(conn, self.sel, self.on_batches, self.on_link_lost)
        queued = {id(event) for event in self.outbox}
        resent = [c.request for c in self.clients.values()
                  if c.waiting and id(c.request) not in queued]
        users = [(c.cid, c.name, c.login_stamp) for c in self.users.values()]
        self.outbox[:0] = [(link.SYNC, users)] + resent

    def on_link_lost(self):
        self.log.info("broker link lost; holding requests until a new broker")
        self.link = None

    def congested(self):
        """True while the broker cannot take more from us: hold client lines."""
        if self.link is None:
            return len(self.outbox) > OUTBOX_LIMIT
        return self.link.congested

    def on_order(self, order):
        if order[0] == "link":            # a broker: here is our end
            self.attach_link(Connection(recv_handle(self.ctrl)))
        elif order[0] == "handoff":       # an acceptor: here is our end
            self.detach_handoff()
            self.handoff = Connection(recv_handle(self.ctrl))
            self.sel.register(self.handoff.fileno(), READ, self.on_handoff)
        else:
            super().on_order(order)

    def detach_handoff(self):
        if self.handoff is not None:
            self.sel.unregister(self.handoff.fileno())
            self.handoff.close()
            self.handoff = None

    def heartbeat_info(self):
        return {"clients": len(self.clients), "users": len(self.users)}

    def poll_timeout(self):
        if self.held:
            return PAUSED_POLL
        return max(0.0, min(self.heartbeat_interval, self.next_sweep - time.monotonic()))

    def stop(self):
        """Shutdown: every client gets ``ERR server-shutdown``, then we exit."""
        self.stopping = True
        for c in list(self.clients.values()):
            self.cut(c, protocol.ERR_SERVER_SHUTDOWN, "server shutdown")
        self.running = False

    def finish(self):
        if self.link is not None:
            self.link.flush_blocking(1.0)

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
        if self.held and not self.congested():
            waiting, self.held = self.held, set()
            for c in waiting:
                if c.sock is not None and not c.waiting:
                    self.resume(c)
            self.end_turn()
        if now >= self.next_sweep:
            self.next_sweep = now + self.sweep_every
            self.sweep_idle(now)

    def end_turn(self):
        """Fan out this turn's MSG lines, write every socket once, send one batch."""
        if self.local:
            self.fan_out_local()
        while self.dirty:
            dirty, self.dirty = self.dirty, set()
            for c in dirty:
                if c.sock is not None:
                    self.flush(c, False)
        if self.msg_run:
            self.close_msg_run()
        if self.outbox and self.link is not None:
            self.link.send(self.outbox)
            self.outbox = []

    def sweep_idle(self, now):
        """One pass over all connections instead of a timer per connection."""
        deadline = now - self.config.idle_timeout
        for c in [c for c in self.clients.values() if c.last_line < deadline]:
            self.cut(c, protocol.ERR_IDLE_TIMEOUT, "idle timeout")
        self.end_turn()

    # -- new connections ------------------------------------------------------

    def on_handoff(self, mask=None):
        for _ in range(HANDOFFS_PER_TURN):
            try:
                fd = recv_handle(self.handoff)
            except (EOFError, OSError):
                self.log.info("acceptor link lost; waiting for a new acceptor")
                self.detach_handoff()
                return
            self.add_client(socket.socket(fileno=fd))
            if not self.handoff.poll():
                return

    def add_client(self, sock):
        sock.setblocking(False)
        try:
            peer = "%s:%s" % sock.getpeername()[:2]
        except OSError:
            peer = "?"
        cid, self.next_cid = self.next_cid, self.next_cid + 1
        c = Client(sock, cid, peer, self.config.max_line, self.now)
        self.clients[cid] = c
        self.board.received[self.slot] += 1
        self.board.live[self.slot] += 1
        self.set_interest(c, READ)

    # -- reading and running lines --------------------------------------------

    def on_readable(self, c):
        try:
            data = c.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.drop(c, "connection error: %s" % (exc.strerror or exc))
            return
        if not data:
            # Half-close: finish what it sent, deliver the answers, then close.
            c.closing = c.closing or "closed by client"
            self.update_interest(c)
            self.dirty.add(c)
            return
        lines = c.reader.feed(data)
        if lines:
            c.last_line = self.now
            if c.held is not None or c.waiting or self.congested():
                self.hold(c, lines)
            else:
                rest = self.run_lines(c, lines)
                if rest:
                    self.hold(c, rest)

    def hold(self, c, lines):
        if c.held is None:
            c.held = lines
            self.update_interest(c)
        else:
            c.held.extend(lines)
        if not c.waiting:
            self.held.add(c)         # held only for the link: tick resumes it

    def resume(self, c):
        """Run the lines held for ``c`` now that nothing stops them."""
        lines, c.held = c.held, None
        rest = self.run_lines(c, lines) if lines else None
        if rest:
            c.held = rest
        else:
            self.update_interest(c)
        self.dirty.add(c)

    def run_lines(self, c, lines):
        """Run lines in order until one needs the broker; return the rest."""
        for i, line in enumerate(lines):
            if line is TOO_LONG:
                self.send(c, protocol.ERR_LINE_TOO_LONG)
                continue
            cmd = parse_line(line, c.name is not None)
            if cmd is None:
                continue
            kind = type(cmd)
            if kind is Msg:
                out = protocol.msg_line(c.name_b, cmd.text)
                self.local.append((c, out))
                self.msg_run.append(out)
            elif kind is Reply:
                self.send(c, cmd.data)
            elif kind is Ping:
                self.send(c, protocol.PONG)
            elif kind is Quit:
                c.closing = "quit"
                self.update_interest(c)
                self.dirty.add(c)
                return None            # lines after QUIT are not run
            else:
                self.ask_broker(c, cmd)
                return lines[i + 1:]
        return None

    def ask_broker(self, c, cmd):
        kind = type(cmd)
        if kind is Login:
            request = (link.LOGIN, c.cid, cmd.name)
        elif kind is Who:
            request = (link.WHO, c.cid)
        elif kind is Dm:
            request = (link.DM, c.cid, cmd.target.lower(),
                       protocol.dm_line(c.name_b, cmd.text))
        else:
            raise TypeError(cmd)
        c.waiting = True
        c.request = request
        self.to_broker(request)

    def to_broker(self, event):
        if self.msg_run:
            self.close_msg_run()
        self.outbox.append(event)

    def close_msg_run(self):
        run, self.msg_run = self.msg_run, []
        self.outbox.append((link.MSG, b"".join(run)))

    # -- what the broker sends ------------------------------------------------

    def on_batches(self, batches):
        for batch in batches:
            for event in batch:
                tag = event[0]
                if tag == link.MSG:
                    self.fan_out(event[1])
                elif tag == link.DELIVER:
                    c = self.users.get(event[1])
                    if c is not None:
                        self.send(c, event[2])
                elif tag == link.ANSWER:
                    c = self.clients.get(event[1])
                    if c is not None and c.waiting:
                        if event[2]:
                            self.send(c, event[2])
                        self.answered(c)
                elif tag == link.GRANTED:
                    c = self.clients.get(event[1])
                    if c is not None and c.waiting:
                        c.name = event[2]
                        c.name_b = c.name.encode()
                        c.login_stamp = event[3]
                        self.users[c.cid] = c
                        self.send(c, protocol.OK)
                        self.log.info("%s logged in from %s", c.name, c.peer)
                        self.answered(c)

    def answered(self, c):
        c.waiting = False
        c.request = None
        if c.held is not None:
            self.resume(c)
        else:
            self.dirty.add(c)

    # -- writing --------------------------------------------------------------

    def send(self, c, data):
        c.out.append(data)
        c.out_bytes += len(data)
        self.dirty.add(c)

    def fan_out(self, blob):
        """Queue the same bytes for every logged-in user of this worker."""
        n = len(blob)
        for c in self.users.values():
            c.out.append(blob)
            c.out_bytes += n
        self.dirty.update(self.users.values())

    def fan_out_local(self):
        """This turn's MSG lines to the local users, each sender's own left out."""
        local, self.local = self.local, []
        senders = {}
        for sender, line in local:
            senders[sender] = None
        if len(senders) == 1:
            (only,) = senders
            blob = b"".join([line for _, line in local])
            for c in self.users.values():
                if c is not only:
                    c.out.append(blob)
                    c.out_bytes += len(blob)
        else:
            blob = b"".join([line for _, line in local])
            for c in self.users.values():
                if c in senders:
                    mine = b"".join([line for s, line in local if s is not c])
                    c.out.append(mine)
                    c.out_bytes += len(mine)
                else:
                    c.out.append(blob)
                    c.out_bytes += len(blob)
        self.dirty.update(self.users.values())

    def flush(self, c, writable):
        """Write what ``c`` is owed: one syscall, no copy of the buffers."""
        out = c.out
        if out and (writable or not c.interest & WRITE):
            if len(out) > IOV_MAX:
                out[:] = [b"".join(out)]
            try:
                sent = c.sock.send(out[0]) if len(out) == 1 else c.sock.sendmsg(out)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self.drop(c, "connection error: %s" % (exc.strerror or exc))
                return
            if sent == c.out_bytes:
                out.clear()
                c.out_bytes = 0
                c.midline = False
            else:
                self.consume(c, sent)
        if c.out_bytes > self.config.max_pending:
            self.cut(c, protocol.ERR_SLOW_CONSUMER, "slow consumer")
            return
        if c.closing and not c.out and not c.waiting and not c.held:
            self.drop(c, c.closing)
            return
        # Output left over means the socket is full: wait until it is writable.
        self.set_interest(c, self.read_interest(c) | (WRITE if out else 0))

    def consume(self, c, sent):
        """Forget the first ``sent`` bytes of ``c.out``."""
        out = c.out
        c.out_bytes -= sent
        i = 0
        while sent and sent >= len(out[i]):
            sent -= len(out[i])
            i += 1
        del out[:i]
        if sent:
            c.midline = out[0][sent - 1:sent] != b"\n"
            out[0] = out[0][sent:]
        elif i:
            c.midline = False

    # -- selector interest and closing ----------------------------------------

    @staticmethod
    def read_interest(c):
        return 0 if (c.held is not None or c.closing) else READ

    def update_interest(self, c):
        """Re-derive the read interest; keep waiting for writability if we were."""
        self.set_interest(c, self.read_interest(c) | (c.interest & WRITE))

    def set_interest(self, c, want):
        have = c.interest
        if want == have:
            return
        if not want:
            self.sel.unregister(c.sock)
        elif not have:
            self.sel.register(c.sock, want, c)
        else:
            self.sel.modify(c.sock, want, c)
        c.interest = want

    def cut(self, c, line, reason):
        """Send ``line`` as best we can without blocking, then close."""
        if c.interest & WRITE:
            # The socket is full: finish the line in flight, then ours.
            tail = c.out[0][:c.out[0].find(b"\n") + 1] if c.midline else b""
            data = tail + line
        else:
            data = b"".join(c.out) + line
        try:
            c.sock.send(data)
        except OSError:
            pass
        self.drop(c, reason)

    def drop(self, c, reason):
        """Close the connection and forget it; the broker announces the user."""
        if c.interest:
            self.sel.unregister(c.sock)
            c.interest = 0
        try:
            c.sock.close()
        except OSError:
            pass
        c.sock = None
        del self.clients[c.cid]
        self.held.discard(c)
        if self.users.pop(c.cid, None) is not None or c.waiting:
            if not self.stopping:
                self.to_broker((link.BYE, c.cid))
        self.board.live[self.slot] -= 1
        if c.name is not None:
            self.log.info("%s disconnected (%s)", c.name, reason)
        else:
            self.log.debug("%s disconnected before login (%s)", c.peer, reason)
