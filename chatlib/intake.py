"""New connections, as a worker takes them: its ends of the two pipes to the
acceptor.

Accepted sockets come in on the hand-off pipe (``chatlib.handoff``), tagged
by the listener they came from; notes go back on the other (``chatlib.notes``):
which connections the worker closed, holds, or lost in transit. The acceptor
may be replaced at any time, so the pipes come and go (``attach``,
``detach``) while the connections stay with the worker.
"""

import selectors
import socket

from chatlib.handoff import recv_socket
from chatlib.notes import note_gone, note_lost, note_open

HANDOFFS_PER_TURN = 256    # new sockets taken per turn, so clients are not starved


def peer_ip(sock):
    try:
        return sock.getpeername()[0]
    except (OSError, IndexError):
        return "?"


class Intake:
    """One worker's ends of the acceptor's pipes, while an acceptor is there.

    ``on_connection(sock, ip, kind)`` gets each new connection, non-blocking;
    ``kind`` is ``handoff.PLAIN`` or ``handoff.TLS``.
    """

    def __init__(self, sel, on_connection, log):
        self.sel = sel
        self.on_connection = on_connection
        self.log = log
        self.handoff = None        # socket: connections from the acceptor
        self.notes = None          # socket: notes to the acceptor
        self.handoffs = 0          # connections received on it, lost ones too
        self.unsent = b""          # notes the pipe could not take yet
        self.starved = False       # out of descriptors, and said so in the log
        self.family = None         # the listening sockets' address family

    def attach(self, handoff_fd, notes_fd, open_ips):
        """A new acceptor, and our ends of its pipes. Before anything else it
        learns which connections we hold: ``open_ips``, one address each."""
        self.detach()
        self.handoff = socket.socket(fileno=handoff_fd)
        self.handoff.setblocking(False)
        self.notes = socket.socket(fileno=notes_fd)
        self.handoffs = 0
        self.sel.register(self.handoff, selectors.EVENT_READ, self.take)
        self.unsent = b"".join([note_open(ip) for ip in open_ips])

    def detach(self):
        if self.handoff is not None:
            self.sel.unregister(self.handoff)
            self.handoff.close()
            self.notes.close()
            self.handoff = self.notes = None
            self.unsent = b""

    def take(self, mask=None):
        """Take the connections waiting in the hand-off pipe (a bounded number
        per turn, so that the clients already here are not starved)."""
        for _ in range(HANDOFFS_PER_TURN):
            try:
                fd, kind = recv_socket(self.handoff)
            except (BlockingIOError, InterruptedError):
                return
            except RuntimeError:
                # Out of descriptors: the kernel dropped the socket in transit
                # (the client sees it closed). Tell the acceptor it is gone.
                if not self.starved:
                    self.log.warning("could not receive a connection: out of file descriptors")
                    self.starved = True
                self.unsent += note_lost(self.handoffs)
                self.handoffs += 1
            except (EOFError, OSError):
                self.log.debug("acceptor link lost; waiting for a new acceptor")
                self.detach()
                return
            else:
                self.handoffs += 1
                self.starved = False
                sock = self.adopt(fd)
                sock.setblocking(False)
                self.on_connection(sock, peer_ip(sock), kind)

    def adopt(self, fd):
        """A socket object for a received descriptor. All come from listening
        sockets on the one ``--host``: learn their family once, and spare the
        three system calls ``socket()`` makes to find it out for each."""
        if self.family is None:
            sock = socket.socket(fileno=fd)
            self.family = sock.family
            return sock
        return socket.socket(self.family, socket.SOCK_STREAM, 0, fileno=fd)

    def gone(self, ip):
        """A connection from ``ip`` is closed: the acceptor frees its slot."""
        if self.notes is not None:
            self.unsent += note_gone(ip)

    def send_notes(self):
        """Send the notes of this turn, without ever blocking on the acceptor."""
        if not self.unsent:
            return
        try:
            sent = self.notes.send(self.unsent, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            sent = len(self.unsent)     # it is gone; a new one gets a snapshot
        self.unsent = self.unsent[sent:]
