"""A connection's state as plain data, for the worker that takes it over.

The record is a dict of named fields, not the ``Client`` object: the code
that reads it is newer than the code that wrote it, and may have changed
``Client``. ``VERSION`` changes whenever a field changes meaning; a worker
refuses a hand-over of a version it does not read (``READS``), and the
upgrade asks the new code which versions it reads before anything moves.

Times are ``time.monotonic()`` values, one clock for every process of a
host, so deadlines carry over as they are.
"""

from chatlib.connection import Client
from chatlib.protocol import TOO_LONG
from chatlib.telnet import INTERRUPT, Answer

VERSION = 1
READS = (1,)

# Fields copied as they are, between a Client and its record.
_PLAIN_FIELDS = ("cid", "ip", "name", "login_stamp", "midline", "connected", "last_line",
                 "waiting", "request", "closing", "tokens", "refilled", "throttled_since",
                 "logged_in_at", "bytes_in", "bytes_out", "relayed_port")


def record(c, relayed_port=None):
    """``c``'s state; ``relayed_port``: its peer's port, when its TLS
    session stays behind from now on (its socket in the new worker is a
    socket pair, which cannot say)."""
    fields = {name: getattr(c, name) for name in _PLAIN_FIELDS}
    fields.update(out=b"".join(c.out), reader=c.reader.state(), held=_held_out(c.held))
    if relayed_port is not None:
        fields["relayed_port"] = relayed_port
    return fields


def client(fields, sock, max_line, burst):
    """A ``Client`` on ``sock`` with the state of ``fields`` (from :func:`record`)."""
    c = Client(sock, fields["cid"], fields["ip"], max_line, fields["connected"], burst)
    for name in _PLAIN_FIELDS:
        setattr(c, name, fields[name])
    if c.name is not None:
        c.name_b = c.name.encode()
    c.reader.restore(fields["reader"])
    c.held = _held_in(fields["held"])
    if fields["out"]:
        c.out.append(fields["out"])
        c.out_bytes = len(fields["out"])
    return c


# Lines read but not run: bytes, and the line reader's markers, which are
# objects of this version's code; as data they are None (a line too long),
# ("answer", bytes) and ("interrupt",) (telnet's).

def _held_out(held):
    if held is None:
        return None
    return [line if type(line) is bytes else None if line is TOO_LONG
            else ("answer", line.data) if type(line) is Answer else ("interrupt",)
            for line in held]


def _held_in(held):
    if held is None:
        return None
    return [line if type(line) is bytes else TOO_LONG if line is None
            else Answer(line[1]) if line[0] == "answer" else INTERRUPT
            for line in held]
