"""The acceptor: accepts TCP connections and hands each to a worker.

The listening socket is created by the supervisor and outlives any acceptor,
so connection attempts wait in the kernel's backlog while an acceptor is
replaced. Each accepted socket goes to a worker over that worker's hand-off
pipe with ``multiprocessing.reduction.sendfds`` (what ``send_handle`` does,
on a socket kept for the pipe's life instead of one dup'ed, wrapped and
closed for every connection), and the acceptor then closes its own copy
(otherwise the TCP connection would outlive the worker's close).

A second pipe carries *notes* back (``chatlib.notes``): which connections
each worker closed, or holds when it meets a new acceptor, or lost in the
hand-off. From them the acceptor knows how many connections each worker holds
and each address has open, which gives:

* least-loaded spreading: stays even under churn and fills a restarted worker
  first, where round-robin would not;
* ``--max-clients`` (``ERR server-full``) and ``--max-per-ip``
  (``ERR too-many-connections``) without asking anyone.
"""

import errno
import socket
import time
from collections import Counter, deque
from multiprocessing.reduction import sendfds
from selectors import EVENT_READ

from chatlib import protocol
from chatlib.notes import LOST, OPEN, NoteReader
from chatlib.service import Service

ACCEPTS_PER_TURN = 256
# accept() errors that mean "out of descriptors or memory": back off, retry.
EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
BACKOFF_MIN, BACKOFF_MAX = 0.01, 1.0
RECENT_HANDOFFS = 4096      # addresses kept to match a worker's "lost" note


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

    def __init__(self, config, pipes, listener, expected=0):
        super().__init__(config, pipes)
        self.listener = listener
        # Wait for the workers running when we were started, so that the
        # first burst of connections is spread over all of them.
        self.awaited = expected
        self.workers = {}                   # slot -> WorkerPipe
        self.per_ip = Counter()             # address -> open connections
        self.backoff = 0.0
        self.resume_at = 0.0
        self.listening = False

    def start(self):
        self.listener.setblocking(False)

    def finish(self):
        self.listener.close()

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
        else:
            super().on_order(order)

    def detach(self, slot):
        """Worker ``slot`` is gone, and so are its connections."""
        pipe = self.workers.pop(slot, None)
        if pipe is not None:
            self.sel.unregister(pipe.notes)
            self.per_ip -= pipe.ips
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

    # -- accepting ------------------------------------------------------------

    def update_listening(self):
        """Accept only with a worker to give sockets to and no back-off running;
        meanwhile connection attempts wait in the kernel's backlog."""
        if len(self.workers) >= self.awaited:
            self.awaited = 0
        want = bool(self.workers) and not self.awaited and time.monotonic() >= self.resume_at
        if want != self.listening:
            if want:
                self.sel.register(self.listener, EVENT_READ, self.on_accept)
            else:
                self.sel.unregister(self.listener)
            self.listening = want

    def poll_timeout(self):
        if self.resume_at:
            return max(0.0, min(self.resume_at - time.monotonic(), super().poll_timeout()))
        return super().poll_timeout()

    def tick(self, now):
        if self.resume_at and now >= self.resume_at:
            self.resume_at = 0.0
            self.update_listening()

    def on_accept(self, mask=None):
        for _ in range(ACCEPTS_PER_TURN):
            if not self.listening:
                return
            try:
                sock, address = self.listener.accept()
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
            try:
                self.dispatch(sock, address[0] if isinstance(address, tuple) else "?")
            finally:
                sock.close()

    def back_off(self, exc):
        """Out of descriptors: stop accepting a while (10 ms doubling to 1 s),
        logging once, instead of spinning or dying."""
        if not self.backoff:
            self.log.error("accept failed (%s); backing off", exc.strerror)
        self.backoff = min(BACKOFF_MAX, max(BACKOFF_MIN, self.backoff * 2))
        self.resume_at = time.monotonic() + self.backoff
        self.update_listening()

    def dispatch(self, sock, ip):
        cfg = self.config
        if sum(pipe.load for pipe in self.workers.values()) >= cfg.max_clients:
            self.refuse(sock, protocol.ERR_SERVER_FULL, "server full", ip)
            return
        if cfg.max_per_ip and self.per_ip[ip] >= cfg.max_per_ip:
            self.refuse(sock, protocol.ERR_TOO_MANY_CONNECTIONS,
                        "too many connections from this address", ip)
            return
        while self.workers:
            slot = min(self.workers, key=lambda k: self.workers[k].load)
            pipe = self.workers[slot]
            try:
                sendfds(pipe.handoff, [sock.fileno()])
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
            return

    def refuse(self, sock, line, reason, ip):
        self.log.debug("refused a connection from %s: %s", ip, reason)
        try:
            sock.setblocking(False)
            sock.send(line)
        except OSError:
            pass
