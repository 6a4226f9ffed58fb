"""A change as one line of text: how the bans (:mod:`chatlib.moderation`)
and the accounts (:mod:`chatlib.accounts`) travel between processes'
files and nodes.

An operation is a tuple of strings and numbers; it travels as its fields
joined by TABs, a float in its ``repr`` (exact), None as ``-``. Text, never
a pickle: anyone who can write to Redis could make a pickle run code on
every node. The caller checks every field of what :func:`decode` gives, as
from a stranger.
"""

import math


def encode(fields):
    """``fields`` (checked already) as one line, without its end of line."""
    return "\t".join("-" if value is None else repr(value) if isinstance(value, float)
                     else value for value in fields).encode()


def decode(data, max_bytes, numbers):
    """The fields of ``data``, those at the positions ``numbers[fields[0]]``
    made numbers (``-``: None). ValueError if it is too long, not UTF-8, or a
    number is not one."""
    if len(data) > max_bytes:
        raise ValueError("operation of %d bytes: at most %d" % (len(data), max_bytes))
    try:
        fields = data.decode("utf-8").split("\t")
    except UnicodeDecodeError:
        raise ValueError("operation not in UTF-8") from None
    for i in numbers.get(fields[0], ()):
        if i < len(fields):
            try:
                fields[i] = None if fields[i] == "-" else float(fields[i])
            except ValueError:
                raise ValueError("bad number %r" % fields[i]) from None
    return tuple(fields)


def time_field(value, what):
    """A wall-clock time of an operation, checked: a finite number of
    seconds, not negative (``what`` names it in the error)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value < 0:
        raise ValueError("bad %s %r" % (what, value))
    return float(value)
