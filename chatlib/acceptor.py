"""The acceptor: accepts TCP connections and hands each to a worker.

The listening sockets (plaintext, TLS, or both) are created by the
supervisor and outlive any acceptor, so connection attempts wait in the
kernel's backlog while an acceptor is replaced. Each accepted socket goes to a
worker over that worker's hand-off pipe with ``chatlib.handoff`` (what
``multiprocessing.reduction.sendfds`` does, on a socket kept for the pipe's
life instead of one dup'ed, wrapped and closed for every connection, with a
byte saying which listener it came from), and the acceptor then closes its
own copy (otherwise the TCP connection would outlive the worker's close). The
acceptor does no TLS: the worker does the handshake.

A second pipe carries *notes* back (``chatlib.notes``): which connections
each worker closed, or holds when it meets a new acceptor, or lost in the
hand-off. From them the acceptor knows how many connections each worker holds
and each address has open, which gives:

* least-loaded spreading: stays even under churn and fills a restarted worker
  first, where round-robin would not;
* ``--max-clients`` (``ERR server-full``) and ``--max-per-ip``
  (``ERR too-many-connections``) without asking anyone.

It also refuses, before a worker sees them, connections from the addresses
the operator banned (``ERR banned``): the supervisor sends it the chat's
bans whenever they change (:mod:`chatlib.moderation`).

Those counts run a moment behind the clients: a close is counted when the
worker's note comes, not when the client closed. ``--max-per-ip`` allows for
that (see :meth:`Acceptor.dispatch`), so that a client that closes and at
once reconnects is not refused.
"""

import errno
import socket
import time
from collections import Counter, deque
from functools import partial
from selectors import EVENT_READ

from chatlib import protocol
from chatlib.handoff import PLAIN, TLS, send_socket
from chatlib.moderation import Moderation
from chatlib.notes import LOST, OPEN, NoteReader
from chatlib.service import Service

ACCEPTS_PER_TURN = 256
# accept() errors that mean "out of descriptors or memory": back off, retry.
EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
BACKOFF_MIN, BACKOFF_MAX = 0.01, 1.0
RECENT_HANDOFFS = 4096      # addresses kept to match a worker's "lost" note
HOLD_FOR = 1.0              # seconds a connection over --max-per-ip waits for a close
HELD_MAX = 256              # connections held so at once, all addresses together


class WorkerPipe:
    """The acceptor's ends of one worker's pipes, and what it knows of that worker."""

    def __init__(self, handoff, notes):
        self.handoff = handoff      # socket: connections go this way...
        self.notes = notes          # socket: ...and notes come back this way
        self.reader = NoteReader()
        self.ips = Counter()        # address -> connections this worker holds
        self.load = 0               # connections this worker holds
        self.handed = 0             # connections handed over on this pipe
        self.recent = deque(maxlen=RECENT_HANDOFFS)   # their addresses, the last ones

    def address_of(self, index):
        """The address of hand-off number ``index``, if it is recent enough."""
        offset = index - (self.handed - len(self.recent))
        return self.recent[offset] if 0 <= offset < len(self.recent) else None

    def close(self):
        self.handoff.close()
        self.notes.close()


class Acceptor(Service):
    role = "acceptor"

    def __init__(self, config, pipes, listeners, expected=0, moderation=None):
        super().__init__(config, pipes)
        self.moderation = moderation or Moderation()   # whose addresses are banned
        self.accepted = 0                   # connections handed on, for the metrics
        self.refused = Counter()            # by the ERR line's reason
        self.listeners = listeners          # [(socket, PLAIN or TLS)]
        # Wait for the workers running when we were started, so that the
        # first burst of connections is spread over all of them.
        self.awaited = expected
        self.workers = {}                   # slot -> WorkerPipe
        self.per_ip = Counter()             # address -> open connections
        self.held = {}                      # address -> deque of (deadline, socket, kind):
        self.held_count = 0                 #   over --max-per-ip, waiting for a close
        self.next_expiry = 0.0              # the first deadline among them
        self.freed = set()                  # addresses with fewer connections this turn
        self.retiring = False               # an upgrade stops us, not a shutdown
        self.backoff = 0.0
        self.resume_at = 0.0
        self.listening = False

    def start(self):
        for listener, _ in self.listeners:
            listener.setblocking(False)

    def finish(self):
        for listener, _ in self.listeners:
            listener.close()
        # At an upgrade the server goes on, and their address is still at
        # its limit: what waiting out HOLD_FOR would have told them.
        line, reason = ((protocol.ERR_TOO_MANY_CONNECTIONS, "too many connections from this "
                         "address") if self.retiring else
                        (protocol.ERR_SERVER_SHUTDOWN, "server shutdown"))
        for ip, queue in self.held.items():
            for _, sock, kind in queue:
                self.refuse(sock, line, reason, ip, kind)
                sock.close()

    # -- workers come and go --------------------------------------------------

    def on_order(self, order):
        if order[0] == "attach":            # a (new) worker in this slot
            slot = order[1]
            self.detach(slot)
            handoff = socket.socket(fileno=self.received_fd())
            pipe = WorkerPipe(handoff, socket.socket(fileno=self.received_fd()))
            self.workers[slot] = pipe
            self.sel.register(pipe.notes, EVENT_READ, lambda mask: self.on_notes(slot, pipe))
            self.update_listening()
        elif order[0] == "detach":
            self.detach(order[1])
        elif order[0] == "moderation":
            self.moderation = order[1]
        elif order[0] == "sync":          # every order before it is applied
            self._report(("answer", order[1]))
        elif order[0] == "retire":        # an upgrade: our successor takes over
            self.retiring = True
            self.stop()
        else:
            super().on_order(order)

    def heartbeat_info(self):
        return {"accepted": self.accepted, "refused": dict(self.refused)}

    def detach(self, slot):
        """Worker ``slot`` is gone, and so are its connections."""
        pipe = self.workers.pop(slot, None)
        if pipe is not None:
            self.sel.unregister(pipe.notes)
            self.per_ip -= pipe.ips
            self.freed.update(pipe.ips)
            pipe.close()
        self.update_listening()

    def on_notes(self, slot, pipe):
        if self.workers.get(slot) is not pipe:
            return                          # detached earlier in this turn
        try:
            data = pipe.notes.recv(65536, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.detach(slot)               # the worker died; the supervisor knows
            return
        for kind, ip in pipe.reader.feed(data):
            if kind == LOST:                # lost in the hand-off: as if closed
                ip = pipe.address_of(ip)
                if ip is None:
                    continue
            if kind == OPEN:
                pipe.load += 1
                pipe.ips[ip] += 1
                self.per_ip[ip] += 1
            else:
                pipe.load -= 1
                if pipe.ips[ip] > 0:
                    pipe.ips[ip] -= 1
                    self.per_ip[ip] -= 1
                    if not self.per_ip[ip]:
                        del self.per_ip[ip], pipe.ips[ip]
                    if ip in self.held:
                        self.freed.add(ip)

    def read_notes(self):
        """Take the notes waiting on every pipe now, without waiting for the
        loop to come to them."""
        for slot, pipe in list(self.workers.items()):
            self.on_notes(slot, pipe)

    # -- accepting ------------------------------------------------------------

    def update_listening(self):
        """Accept only with a worker to give sockets to and no back-off running;
        meanwhile connection attempts wait in the kernel's backlog."""
        if len(self.workers) >= self.awaited:
            self.awaited = 0
        want = bool(self.workers) and not self.awaited and time.monotonic() >= self.resume_at
        if want != self.listening:
            for listener, kind in self.listeners:
                if want:
                    self.sel.register(listener, EVENT_READ, partial(self.on_accept, listener, kind))
                else:
                    self.sel.unregister(listener)
            self.listening = want

    def poll_timeout(self):
        timeout = super().poll_timeout()
        for at in (self.resume_at, self.next_expiry if self.held else 0.0):
            if at:
                timeout = max(0.0, min(at - time.monotonic(), timeout))
        return timeout

    def tick(self, now):
        if self.resume_at and now >= self.resume_at:
            self.resume_at = 0.0
            self.update_listening()
        if self.freed or (self.held and now >= self.next_expiry):
            self.release(now)

    def on_accept(self, listener, kind, mask=None):
        for _ in range(ACCEPTS_PER_TURN):
            if not self.listening:
                return
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno in EXHAUSTED:
                    self.back_off(exc)
                    return
                if exc.errno == errno.ECONNABORTED:
                    continue
                raise
            if self.backoff:
                self.log.info("accepting again")
                self.backoff = 0.0
            held = False
            try:
                held = self.dispatch(sock, address[0] if isinstance(address, tuple) else "?",
                                     kind)
            finally:
                if not held:
                    sock.close()

    def back_off(self, exc):
        """Out of descriptors: stop accepting a while (10 ms doubling to 1 s),
        logging once, instead of spinning or dying."""
        if not self.backoff:
            self.log.error("accept failed (%s); backing off", exc.strerror)
        self.backoff = min(BACKOFF_MAX, max(BACKOFF_MIN, self.backoff * 2))
        self.resume_at = time.monotonic() + self.backoff
        self.update_listening()

    def dispatch(self, sock, ip, kind=PLAIN):
        """Hand ``sock`` to a worker, refuse it, or hold it; True if held (the
        acceptor keeps it open, to hand it on or refuse it later).

        An address's count lags behind its clients: a connection counts until
        its worker's note says it closed, a moment after the client closed
        (the worker's next loop turn, then ours). A client at ``--max-per-ip``
        that closes a connection and at once opens another can be accepted in
        between, and must not be refused for a connection it no longer has.
        So before refusing, the acceptor reads the notes waiting; if the
        address is still at its limit, the new connection waits, unanswered,
        until a note says a connection from that address closed (then it is
        handed on, after those waiting before it), or for HOLD_FOR seconds
        (then it is refused). A client truly over the limit is still refused,
        HOLD_FOR later; one under it never is, as long as its worker notices
        the close within HOLD_FOR: one loop turn, milliseconds, longer only
        for a client whose reads are paused (by flood control). What waits is
        bounded: ``--max-per-ip`` connections per address (no more of its
        closes can be in flight) and HELD_MAX in all; past either, a
        connection is refused at once.

        Other ways fall short: the acceptor cannot see the close itself (it
        keeps no copy of a handed socket, or the connection would outlive
        the worker's close), and a margin over the limit would only make the
        race rarer. ``--max-clients`` only reads the waiting notes before
        refusing: it protects the server, where a moment's lag errs on the
        safe side.
        """
        cfg = self.config
        if self.moderation.has_address_bans and self.moderation.banned_address(ip, time.time()):
            self.refuse(sock, protocol.ERR_BANNED, "banned", ip, kind)
            return False
        if self.server_full():
            self.refuse(sock, protocol.ERR_SERVER_FULL, "server full", ip, kind)
            return False
        limit = cfg.max_per_ip
        if limit and (self.per_ip[ip] >= limit or ip in self.held):
            self.read_notes()
            if self.per_ip[ip] >= limit or ip in self.held:
                self.freed.add(ip)      # release() hands on, in order, what fits
                return self.hold(sock, ip, kind)
        self.hand_off(sock, ip, kind)
        return False

    def server_full(self):
        def full():
            return sum(pipe.load for pipe in self.workers.values()) >= self.config.max_clients
        if not full():
            return False
        self.read_notes()
        return full()

    def hold(self, sock, ip, kind=PLAIN):
        """Keep ``sock`` until a connection from ``ip`` closes (see dispatch);
        True if held, False if refused at once."""
        queue = self.held.get(ip)
        if self.held_count >= HELD_MAX or (queue and len(queue) >= self.config.max_per_ip):
            self.refuse(sock, protocol.ERR_TOO_MANY_CONNECTIONS,
                        "too many connections from this address", ip, kind)
            return False
        if queue is None:
            queue = self.held[ip] = deque()
        deadline = time.monotonic() + HOLD_FOR
        if not self.held_count:
            self.next_expiry = deadline
        queue.append((deadline, sock, kind))
        self.held_count += 1
        self.log.debug("holding a connection from %s: %d open, waiting for a close",
                       ip, self.per_ip[ip])
        return True

    def release(self, now):
        """Hand on the held connections that fit now, in order of arrival per
        address; refuse those held for HOLD_FOR."""
        self.freed = set()
        limit = self.config.max_per_ip
        for ip in list(self.held):
            queue = self.held[ip]
            while queue and self.workers and self.per_ip[ip] < limit:
                deadline, sock, kind = queue.popleft()
                self.held_count -= 1
                self.log.debug("a connection from %s closed: handing on one held %.0f ms",
                               ip, (now - deadline + HOLD_FOR) * 1000)
                try:
                    if self.server_full():
                        self.refuse(sock, protocol.ERR_SERVER_FULL, "server full", ip, kind)
                    else:
                        self.hand_off(sock, ip, kind)
                finally:
                    sock.close()
            while queue and queue[0][0] <= now:
                _, sock, kind = queue.popleft()
                self.held_count -= 1
                self.refuse(sock, protocol.ERR_TOO_MANY_CONNECTIONS,
                            "too many connections from this address", ip, kind)
                sock.close()
            if not queue:
                del self.held[ip]
        if self.held:
            self.next_expiry = min(queue[0][0] for queue in self.held.values())

    def hand_off(self, sock, ip, kind=PLAIN):
        """Send ``sock`` (from the listener ``kind``) to the least-loaded
        worker, and count it there."""
        while self.workers:
            slot = min(self.workers, key=lambda k: self.workers[k].load)
            pipe = self.workers[slot]
            try:
                send_socket(pipe.handoff, sock.fileno(), kind)
            except (OSError, RuntimeError) as exc:   # RuntimeError: macOS had no acknowledgement
                if getattr(exc, "errno", None) in EXHAUSTED:   # the kernel is short of memory
                    self.back_off(exc)
                    return
                self.log.warning("worker-%d unreachable (%s)", slot, exc)
                self.detach(slot)
                continue
            pipe.load += 1
            pipe.ips[ip] += 1
            self.per_ip[ip] += 1
            pipe.handed += 1
            pipe.recent.append(ip)
            self.accepted += 1
            return

    def refuse(self, sock, line, reason, ip, kind=PLAIN):
        """Say ``line`` and close. Not to a TLS client: it would take it for a
        broken record, and saying it in TLS would cost a handshake, which is
        what a refusal must not cost. It is closed without a word."""
        self.log.debug("refused a connection from %s: %s", ip, reason)
        self.refused[line[4:-1].decode()] += 1          # "ERR <reason>\n"
        if kind == TLS:
            return
        try:
            # Non-blocking by flag: a refusal costs no ioctl (the banned
            # flood is all refusals: docs/BENCHMARKS.md).
            sock.send(line, socket.MSG_DONTWAIT)
            # Drop what it sent meanwhile (a held one had time to send its
            # LOGIN): closed with unread input, a connection is reset, and
            # the client may never read the line.
            sock.recv(65536, socket.MSG_DONTWAIT)
        except OSError:
            pass
