"""The TLS connections an old worker keeps after an upgrade.

A TLS session lives in the ``SSLObject`` that negotiated it: Python can
neither hand it to another process nor export its keys and sequence
numbers. So the old worker stays on for its TLS users, as a relay: it
holds their encryption, and passes their plaintext over a socket pair to
the new worker, which holds everything else (name, lines, output) and
treats the pair as the connection. Nobody is logged out; the cost is this
process, two descriptors and up to ``2 * LIMIT`` bytes per connection,
until the last of them leaves (``ctl version`` and the statistics count
them). A later upgrade moves the plaintext end like any socket: relays
never chain.
"""

import selectors
import socket
import ssl

from chatlib.connection import set_interest
from chatlib.tls import send_some

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE
RECV_SIZE = 65536
LIMIT = 256 * 1024      # bytes either way before the relay stops reading the other side


class TlsRelay:
    """Every relayed connection of one old worker, on its selector."""

    def __init__(self, sel, pairs):
        """``pairs``: [(Client over a chatlib.tls.TlsStream, our end of its pair)]."""
        self.sel = sel
        self.connections = set()
        for c, plain in pairs:
            plain.setblocking(False)
            relayed = Relayed(self, c.sock, plain)
            self.connections.add(relayed)
            relayed.update()

    def __len__(self):
        return len(self.connections)

    def gone(self, relayed):
        self.connections.discard(relayed)

    def close_all(self):
        for relayed in list(self.connections):
            relayed.close()


class Relayed:
    """One connection: the client's TLS stream on one side, the plaintext
    pair to the new worker on the other, and what each owes the other."""

    __slots__ = ("relay", "stream", "plain", "to_plain", "to_client", "client_ended",
                 "worker_ended", "stream_interest", "plain_interest")

    def __init__(self, relay, stream, plain):
        self.relay = relay
        self.stream = stream          # chatlib.tls.TlsStream
        self.plain = plain
        self.to_plain = b""           # the client's plaintext, for the new worker
        self.to_client = b""          # the new worker's, not yet encrypted
        self.client_ended = False
        self.worker_ended = False
        self.stream_interest = 0
        self.plain_interest = 0

    def on_stream(self, mask):
        if mask & READ:
            try:
                data = self.stream.recv(RECV_SIZE)
            except (BlockingIOError, ssl.SSLWantReadError):
                data = None
            except OSError:
                self.close()
                return
            if data == b"":
                self.client_ended = True
                self.end_plain()
            elif data:
                self.to_plain += data
        self.flush()

    def on_plain(self, mask):
        if mask & READ:
            try:
                data = self.plain.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                data = b""
            if data == b"":
                self.worker_ended = True
            elif data:
                self.to_client += data
        self.flush()

    def end_plain(self):
        if not self.to_plain:
            try:
                self.plain.shutdown(socket.SHUT_WR)    # the new worker sees the client's end
            except OSError:
                pass

    def flush(self):
        """Write what each side is owed; close when the new worker has ended
        and the client has it all."""
        try:
            if self.to_plain:
                self.to_plain = send_some(self.plain, self.to_plain)
                if not self.to_plain and self.client_ended:
                    self.end_plain()
            if self.to_client:
                self.to_client = self.to_client[self.stream.sendmsg((self.to_client,)):]
            elif self.stream.backlog:
                self.stream.push()
        except (OSError, ValueError):
            self.close()
            return
        if self.worker_ended and not self.to_client and not self.stream.backlog:
            self.close()
            return
        self.update()

    def update(self):
        """Read a side only while the other can take it; wait for a side
        to be writable only while it owes something."""
        sel = self.relay.sel
        want = ((READ if not self.client_ended and len(self.to_plain) < LIMIT else 0)
                | (WRITE if self.stream.backlog else 0))
        self.stream_interest = set_interest(sel, self.stream.sock, self.stream_interest, want,
                                            self.on_stream)
        want = ((READ if not self.worker_ended and len(self.to_client) < LIMIT else 0)
                | (WRITE if self.to_plain else 0))
        self.plain_interest = set_interest(sel, self.plain, self.plain_interest, want,
                                           self.on_plain)

    def close(self):
        sel = self.relay.sel
        set_interest(sel, self.stream.sock, self.stream_interest, 0, None)
        set_interest(sel, self.plain, self.plain_interest, 0, None)
        self.stream_interest = self.plain_interest = 0
        self.stream.close()
        self.plain.close()
        self.relay.gone(self)
