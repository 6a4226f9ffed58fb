"""The acceptor: accepts TCP connections and hands each to a worker.

The listening socket is created by the supervisor and outlives any acceptor,
so connection attempts wait in the kernel's backlog while an acceptor is
replaced. Each accepted socket goes to a worker with
``multiprocessing.reduction.send_handle`` over that worker's pipe, and the
acceptor then closes its own copy (otherwise the TCP connection would outlive
the worker's close).

Spreading: least-loaded. Each worker publishes how many connections it holds
and how many it has received on a :class:`~chatlib.loadboard.LoadBoard`; the
acceptor adds what it handed out that the worker has not taken yet. Unlike
round-robin this stays even under churn and fills a restarted worker first,
and it gives ``--max-clients`` its exact total for free.
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

    def __init__(self, config, ctrl, listener, board):
        super().__init__(config, ctrl)
        self.listener = listener
        self.handoffs = {}                  # slot -> Connection to that worker
        self.board = board
        self.handed = list(board.received)   # sockets sent to each worker
        self.backoff = 0.0
        self.resume_at = 0.0
        self.listening = False

    def start(self):
        self.listener.setblocking(False)

    def update_listening(self):
        """Accept only with a worker to give sockets to and no back-off running;
        meanwhile connection attempts wait in the kernel's backlog."""
        want = bool(self.handoffs) and time.monotonic() >= self.resume_at
        if want != self.listening:
            if want:
                self.sel.register(self.listener, EVENT_READ, self.on_accept)
            else:
                self.sel.unregister(self.listener)
            self.listening = want

    def on_order(self, order):
        if order[0] == "attach":            # a new worker in this slot
            slot = order[1]
            self.detach(slot)
            self.handoffs[slot] = Connection(recv_handle(self.ctrl))
            self.handed[slot] = self.board.received[slot]   # in-flight ones died
            self.update_listening()
        elif order[0] == "detach":
            self.detach(order[1])
        else:
            super().on_order(order)

    def detach(self, slot):
        old = self.handoffs.pop(slot, None)
        if old is not None:
            old.close()
        self.update_listening()

    def poll_timeout(self):
        if self.resume_at:
            return max(0.0, min(self.resume_at - time.monotonic(), super().poll_timeout()))
        return super().poll_timeout()

    def tick(self, now):
        if self.resume_at and now >= self.resume_at:
            self.resume_at = 0.0
            self.update_listening()

    def finish(self):
        self.listener.close()

    def on_accept(self, mask=None):
        for _ in range(ACCEPTS_PER_TURN):
            if not self.listening:
                return
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
        self.update_listening()

    def load(self, slot):
        board = self.board
        return board.live[slot] + self.handed[slot] - board.received[slot]

    def dispatch(self, sock):
        while self.handoffs:
            total = sum(self.load(s) for s in self.handoffs)
            if total >= self.config.max_clients:
                self.refuse(sock, protocol.ERR_SERVER_FULL, "server full")
                return
            slot = min(self.handoffs, key=self.load)
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
