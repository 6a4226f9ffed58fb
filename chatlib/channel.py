"""A batched, non-blocking message link between two processes' event loops.

Wraps one end of a ``multiprocessing.Pipe`` (a Unix socket pair). Each side's
loop collects every event of a loop turn into one list and calls
:meth:`Channel.send` once: one pickle and (usually) one ``sendmsg`` per batch,
never one per message.

Why not ``Connection.send_bytes``/``recv_bytes``: they need a blocking
descriptor, and two loops that block writing to each other while neither
reads deadlock (so would two that block reading the rest of a frame). Here
the descriptor is non-blocking both ways and frames (a 4-byte length, then a
pickle) are cut and joined in user space: a loop never waits on its peer, so
no cycle of waits can form, and there is no thread to pay the GIL for.

Backpressure: what the kernel will not take yet waits in :attr:`pending`;
above ``limit`` bytes the channel is :attr:`congested` and its owner must stop
producing (a worker stops reading its clients, the broker its workers).
"""

import os
import pickle
import selectors
import socket

from chatlib.connection import IOV_MAX, drop_sent, set_interest

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE
RECV_SIZE = 1 << 18          # bytes read at once; a bigger frame grows the buffer
_HEADER = 4
_DUMP = pickle.HIGHEST_PROTOCOL


class Channel:
    """One end of a link, registered on ``sel``.

    ``on_batches(batches)`` gets every complete batch read in one go;
    ``on_closed()`` is called once when the peer has gone.
    """

    def __init__(self, conn, sel, on_batches, on_closed, limit=8 << 20):
        # Take the descriptor over from the Connection as a socket of our own.
        self.sock = socket.socket(fileno=os.dup(conn.fileno()))
        conn.close()
        self.sock.setblocking(False)
        self.sel = sel
        self.on_batches = on_batches
        self.on_closed = on_closed
        self.limit = limit
        self.pending = []             # frames (header, body) not yet written
        self.pending_bytes = 0
        self.inbox = bytearray(RECV_SIZE)   # what was read, from a frame's start
        self.filled = 0               # bytes of it in use
        self.closed = False
        self.unwritable = False       # the peer is gone: nothing more to send it
        self.reading = True
        self.frames_out = 0           # counters for statistics
        self.bytes_out = 0
        self.events = READ           # what the selector watches for
        sel.register(self.sock, READ, self.on_ready)

    @property
    def congested(self):
        return self.pending_bytes > self.limit

    def send(self, batch):
        """Frame and write one batch; what does not fit waits for writability."""
        if self.closed or self.unwritable:
            return
        body = pickle.dumps(batch, _DUMP)
        self.frames_out += 1
        self.bytes_out += len(body)
        frame = [len(body).to_bytes(_HEADER, "big"), body]
        if self.pending:
            self.pending.extend(frame)
            self.pending_bytes += _HEADER + len(body)
            return
        self.pending = frame
        self.pending_bytes = _HEADER + len(body)
        self._write()

    def on_ready(self, mask):
        if mask & WRITE and not self.closed:
            self._write()
        if mask & READ and not self.closed:
            self._read()

    def _write(self):
        if len(self.pending) > IOV_MAX:
            self.pending = [b"".join(self.pending)]
        try:
            sent = self.sock.sendmsg(self.pending)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._peer_gone()
            return
        self.pending_bytes -= sent
        if not self.pending_bytes:
            self.pending = []
            self._update()
            return
        drop_sent(self.pending, sent)
        self._update()

    def set_reading(self, reading):
        """Stop (or resume) reading from the peer: backpressure upstream."""
        self.reading = reading
        self._update()

    def _update(self):
        if self.closed:
            return
        events = (READ if self.reading else 0) | (WRITE if self.pending else 0)
        self.events = set_interest(self.sel, self.sock, self.events, events, self.on_ready)

    def _read(self):
        """Read into one buffer kept for the channel's life, and unpickle
        every complete frame in it. (A fresh ``recv`` of a large size would
        cost an mmap, an mremap and a munmap per read.)"""
        inbox, filled = self.inbox, self.filled
        try:
            with memoryview(inbox) as free:
                got = self.sock.recv_into(free[filled:])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            got = 0
        if not got:
            self._lost()
            return
        end = filled + got
        batches = []
        pos = 0
        with memoryview(inbox) as view:
            while end - pos >= _HEADER:
                size = int.from_bytes(view[pos:pos + _HEADER], "big")
                if end - pos - _HEADER < size:
                    break
                pos += _HEADER
                batches.append(pickle.loads(view[pos:pos + size]))
                pos += size
        self.filled = end - pos
        if pos and self.filled:
            inbox[:self.filled] = inbox[pos:end]       # the start of the next frame
        if self.filled >= _HEADER:
            need = _HEADER + int.from_bytes(inbox[:_HEADER], "big")
            if need > len(inbox):                      # a frame bigger than the buffer
                inbox.extend(bytes(need - len(inbox)))
        if batches:
            self.on_batches(batches)

    def _peer_gone(self):
        """A write found the peer gone (EPIPE, ECONNRESET). What it sent
        before it went is still in our buffer, a retiring broker's last
        lines and acknowledgements among them: read on to the end, whatever
        the backpressure said; only then is the link lost."""
        self.unwritable = True
        self.pending = []
        self.pending_bytes = 0
        self.reading = True
        self._update()

    def _lost(self):
        self.close()
        self.on_closed()

    def close(self):
        if not self.closed:
            self.closed = True
            if self.events:
                self.sel.unregister(self.sock)
            self.sock.close()
            self.pending = []
            self.pending_bytes = 0

    def flush_blocking(self, timeout):
        """At exit: give what is still pending up to ``timeout`` s to go out."""
        if self.closed or not self.pending:
            return
        self.sock.settimeout(timeout)
        try:
            self.sock.sendall(b"".join(self.pending))
        except OSError:
            pass
