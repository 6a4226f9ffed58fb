"""The acceptor: accepts TCP connections and hands each to a worker.

The listening socket is created by the supervisor and outlives any acceptor,
so connection attempts wait in the kernel's backlog while an acceptor is
replaced. Each accepted socket goes to a worker with
``multiprocessing.reduction.send_handle`` over that worker's pipe, and the
acceptor then closes its own copy (otherwise the TCP connection would outlive
the worker's close).

Spreading: least-loaded. Each worker counts the connections it has closed in
a shared array (one writer per slot, no lock needed); the acceptor counts what
it handed out; the difference is each worker's live load. Unlike round-robin
this stays even under churn and fills a restarted worker first, and it gives
``--max-clients`` its exact total for free.
"""

import errno
import socket
import time
from selectors import EVENT_READ
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle

from chatlib import protocol
from chatlib.service import Service

ACCEPTS_PER_TURN = 256
# accept() errors that mean "out of descriptors or memory": back off, retry.
_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
BACKOFF_MIN, BACKOFF_MAX = 0.01, 1.0


class Acceptor(Service):
    role = "acceptor"

    def __init__(self, config, ctrl, listener, handoffs, closed_counts):
        super().__init__(config, ctrl)
        self.listener = listener
        self.handoffs = dict(handoffs)      # slot -> Connection to that worker
        self.closed_counts = closed_counts
        self.handed = [closed_counts[i] for i in range(len(closed_counts))]
        self.backoff = 0.0
        self.resume_at = 0.0
        self.listening = False

    def start(self):
        self.listener.setblocking(False)
        self.listen()

    def listen(self):
        self.sel.register(self.listener, EVENT_READ, self.on_accept)
        self.listening = True

    def on_order(self, order):
        if order[0] == "attach":            # a new worker in this slot
            slot = order[1]
            self.detach(slot)
            self.handoffs[slot] = Connection(recv_handle(self.ctrl))
            self.handed[slot] = self.closed_counts[slot]
        elif order[0] == "detach":
            self.detach(order[1])
        else:
            super().on_order(order)

    def detach(self, slot):
        old = self.handoffs.pop(slot, None)
        if old is not None:
            old.close()

    def poll_timeout(self):
        if not self.listening:
            return max(0.0, self.resume_at - time.monotonic())
        return super().poll_timeout()

    def tick(self, now):
        if not self.listening and now >= self.resume_at:
            self.listen()

    def finish(self):
        self.listener.close()

    def on_accept(self, mask=None):
        for _ in range(ACCEPTS_PER_TURN):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno in _EXHAUSTED:
                    self.back_off(exc)
                    return
                if exc.errno == errno.ECONNABORTED:
                    continue
                raise
            self.backoff = 0.0
            try:
                self.dispatch(sock)
            finally:
                sock.close()

    def back_off(self, exc):
        """Out of descriptors: stop accepting a while (10 ms doubling to 1 s)."""
        if not self.backoff:
            self.log.error("accept failed (%s); backing off", exc.strerror)
        self.backoff = min(BACKOFF_MAX, max(BACKOFF_MIN, self.backoff * 2))
        self.resume_at = time.monotonic() + self.backoff
        self.sel.unregister(self.listener)
        self.listening = False

    def live(self, slot):
        return self.handed[slot] - self.closed_counts[slot]

    def dispatch(self, sock):
        while self.handoffs:
            total = sum(self.live(s) for s in self.handoffs)
            if total >= self.config.max_clients:
                self.refuse(sock, protocol.ERR_SERVER_FULL, "server full")
                return
            slot = min(self.handoffs, key=self.live)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                send_handle(self.handoffs[slot], sock.fileno(), None)
            except OSError as exc:
                self.log.warning("worker-%d unreachable (%s)", slot, exc)
                self.detach(slot)
                continue
            self.handed[slot] += 1
            return
        self.refuse(sock, protocol.ERR_SERVER_FULL, "no worker available")

    def refuse(self, sock, line, reason):
        self.log.warning("refused a connection: %s", reason)
        try:
            sock.setblocking(False)
            sock.send(line)
        except OSError:
            pass
