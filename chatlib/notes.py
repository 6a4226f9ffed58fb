"""The vocabulary of the notes from a worker to the acceptor.

Each worker has two pipes to the acceptor. On the first the acceptor hands it
accepted sockets (``multiprocessing.reduction.sendfds``); on the second the
worker answers with *notes*, so that the acceptor knows, exactly, how many
connections each worker holds and how many each address has open: that is
what it spreads the load and applies ``--max-clients`` and ``--max-per-ip``
with, without asking anyone. (Two pipes, since a pipe that carries
descriptors carries nothing else back: docs/ARCHITECTURE.md, "Processes".)

Notes go one way only, worker -> acceptor; the acceptor never writes on this
pipe. A note is one line of ASCII, ``\\n``-terminated:

    ``-IP``     the worker closed a connection from address ``IP`` (the
                client left, or was cut). It is sent at the end of the turn
                in which the worker noticed, so it reaches the acceptor a
                moment after the close: a client that closes and at once
                reconnects may be accepted before it (the acceptor allows for
                that; see ``Acceptor.dispatch``).
    ``+IP``     the worker holds a connection from ``IP``: one note for each,
                sent when it first meets a new acceptor (after the acceptor
                was restarted, it knows nothing), before any other note.
    ``!N``      the worker could not receive hand-off number ``N`` on this
                pipe (out of descriptors: the kernel dropped the socket in
                transit, and the client saw it closed). Hand-offs are counted
                from 0 on each new pair of pipes, the lost ones too. The
                acceptor takes it as a ``-`` for that hand-off's address, if
                it still remembers it.

The acceptor counts a connection as the worker's from the moment it hands it
over: the worker confirms nothing.

Both sides use this module: the worker encodes with :func:`note_open`,
:func:`note_gone` and :func:`note_lost`; the acceptor decodes with a
:class:`NoteReader`, one per pipe.
"""

OPEN = "+"
GONE = "-"
LOST = "!"


def note_open(ip):
    """The worker holds a connection from ``ip`` (for a new acceptor)."""
    return b"+%s\n" % ip.encode()


def note_gone(ip):
    """The worker closed a connection from ``ip``."""
    return b"-%s\n" % ip.encode()


def note_lost(index):
    """The worker could not receive hand-off number ``index`` on this pipe."""
    return b"!%d\n" % index


class NoteReader:
    """Decodes the bytes read from one notes pipe, which may end mid-note."""

    __slots__ = ("partial",)

    def __init__(self):
        self.partial = b""

    def feed(self, data):
        """The notes completed by ``data``, in order, as ``(kind, value)``:
        ``(OPEN, ip)``, ``(GONE, ip)`` or ``(LOST, index)``. A line of any
        other kind is skipped."""
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        notes = []
        for line in lines:
            kind = line[:1]
            if kind == b"-":
                notes.append((GONE, line[1:].decode()))
            elif kind == b"+":
                notes.append((OPEN, line[1:].decode()))
            elif kind == b"!" and line[1:].isdigit():
                notes.append((LOST, int(line[1:])))
        return notes
