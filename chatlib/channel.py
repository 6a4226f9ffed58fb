"""A batched, deadlock-free message link between two processes.

Wraps one end of a ``multiprocessing.Pipe``. Each side's event loop collects
every event of a loop turn into one list and calls :meth:`Channel.send` once:
one pickle and one ``send_bytes`` per batch, never per message.

Why a writer thread: a ``Connection`` needs a blocking descriptor, and two
processes that block writing to each other while neither reads deadlock. The
loop never writes; it hands pickled batches to a thread that does the blocking
``send_bytes``. The loop keeps reading whatever happens, so no cycle of waits
can form. The hand-off is bounded by :attr:`backlog` (bytes queued but not yet
written): above ``limit`` the loop must stop producing (:attr:`congested`),
which is how backpressure travels from a slow reader back to the clients.

Reading stays in the loop: when the descriptor is readable, :meth:`recv`
returns the batches that have arrived. ``recv_bytes`` may block for the rest
of a frame, but the peer's writer thread completes frames on its own.
"""

import logging
import pickle
import queue
import threading

log = logging.getLogger(__name__)

_DUMP = pickle.HIGHEST_PROTOCOL
_STOP = None


class Channel:
    __slots__ = ("conn", "limit", "_queue", "_queued", "_written",
                 "_thread", "closed", "__weakref__")

    def __init__(self, conn, limit=8 << 20):
        self.conn = conn
        self.limit = limit
        self._queue = queue.SimpleQueue()
        self._queued = 0          # bytes handed to the thread (loop writes it)
        self._written = 0         # bytes the thread has written (thread writes it)
        self.closed = False       # set once the peer is gone
        self._thread = threading.Thread(target=self._write_forever,
                                        name="channel-writer", daemon=True)
        self._thread.start()

    def fileno(self):
        return self.conn.fileno()

    @property
    def backlog(self):
        return self._queued - self._written

    @property
    def congested(self):
        return self.backlog > self.limit

    def send(self, batch):
        """Queue one batch (a list of events) for the peer; never blocks."""
        if self.closed:
            return
        data = pickle.dumps(batch, _DUMP)
        self._queued += len(data)
        self._queue.put(data)

    def recv(self, most=16):
        """Return the batches that have arrived (at least one frame is read).

        Raises ``EOFError`` when the peer has gone.
        """
        conn = self.conn
        batches = [pickle.loads(conn.recv_bytes())]
        while len(batches) < most and conn.poll():
            batches.append(pickle.loads(conn.recv_bytes()))
        return batches

    def close(self):
        """Flush what is queued (the thread finishes it) and stop the thread."""
        if not self.closed:
            self.closed = True
            self._queue.put(_STOP)

    def join(self, timeout):
        """Wait up to ``timeout`` s for queued batches to be written."""
        self._thread.join(timeout)

    def _write_forever(self):
        get, send = self._queue.get, self.conn.send_bytes
        while True:
            data = get()
            if data is _STOP:
                return
            try:
                send(data)
            except OSError:
                # The peer is gone; the loop learns it from EOF on the read
                # side. Drop what is left rather than block anybody.
                self.closed = True
                return
            self._written += len(data)
