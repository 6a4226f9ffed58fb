"""The operator's ``users``: one row per logged-in user, and how it prints.

Rows come from every worker of this node (with their connections' figures)
and, in cluster mode, from Redis for the other nodes' users (without them);
the supervisor merges them in login order and prints one line each.
"""

import time
from collections import namedtuple

UserRow = namedtuple("UserRow", "stamp name node address port tls since idle "
                                "bytes_in bytes_out pending")
UserRow.__doc__ = """One logged-in user. ``stamp`` orders logins (as WHO does);
``since`` is the wall-clock login time; ``node`` None for this node;
``idle`` (seconds), ``bytes_in``, ``bytes_out`` and ``pending`` (output not
yet written) are known for this node's users only (None elsewhere)."""


def utc(when):
    """A wall-clock time as the operator reads it, in UTC; None: ``never``."""
    return "never" if when is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def user_line(row, this_node):
    """``NAME node=N from=ADDR:PORT tls=yes|no since=ISO idle=S`` and, for
    this node's users, ``in=B out=B pending=B``."""
    address = "[%s]" % row.address if ":" in (row.address or "") else row.address
    since = utc(row.since) if row.since else "-"
    fields = ["%s node=%s from=%s:%s tls=%s since=%s" % (
        row.name, row.node or this_node, address or "-", row.port or "-",
        "yes" if row.tls else "no", since)]
    if row.idle is not None:
        fields.append("idle=%d" % row.idle)
    if row.bytes_in is not None:
        fields.append("in=%d out=%d pending=%d" % (row.bytes_in, row.bytes_out, row.pending))
    return " ".join(fields)
