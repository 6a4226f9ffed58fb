"""What one node tells the others: the records in the ``d`` field of a bus entry.

A broker turn's lines for other nodes travel as one stream entry (see
:mod:`chatlib.cluster.registry`), its records in the order the worker batches came:

    (ORIGIN, slot, n)   the records that follow come from worker ``slot``'s
                        batch ``n`` (``slot`` ``dm``: a DM sent on its own,
                        numbered by the broker), so that a receiving worker
                        drops lines it had before (:class:`chatlib.delivery.Inbound`)
    (BROADCAST, blob)   ready-made ``MSG`` lines, for every user of the node
    (DM, key, line)     a ``DM`` line for the user ``key`` (lower-case name)

The operator's commands for every node travel the same way, in the ``c``
field (:func:`encode_control`):

    (KICK, key, reason)   close user ``key`` with ``ERR kicked``, where held
    (NOTICE, text)        ``NOTICE text`` for every user
    (MODERATION, op)      a change of the bans and mutes
                          (:func:`chatlib.moderation.encode_op`)
    (ACCOUNT, op)         a change of the accounts (:func:`chatlib.accounts.encode_op`)

Each record is a tag byte, then its fields, each a 4-byte length and the
bytes: no pickle, since anyone who can write to Redis could make a pickle
run code on every node. Sans-IO, tested in ``tests/test_bus.py``.
"""

from chatlib import accounts, moderation

ORIGIN = b"B"
BROADCAST = b"M"
DM = b"D"
KICK = b"K"
NOTICE = b"N"
MODERATION = b"O"
ACCOUNT = b"A"
_FIELDS = {ORIGIN: 2, BROADCAST: 1, DM: 2, KICK: 2, NOTICE: 1, MODERATION: 1, ACCOUNT: 1}


class Records:
    """The records of one entry being built, with one ORIGIN per run of a batch."""

    def __init__(self):
        self.parts = []
        self.origin = None
        self.size = 0           # bytes of the fields so far

    def __bool__(self):
        return bool(self.parts)

    def _field(self, data):
        self.parts.append(len(data).to_bytes(4, "big"))
        self.parts.append(data)
        self.size += len(data)

    def from_batch(self, slot, number):
        if self.origin != (slot, number):
            self.origin = (slot, number)
            self.parts.append(ORIGIN)
            self._field(str(slot).encode())
            self._field(b"%d" % number)

    def broadcast(self, blob):
        self.parts.append(BROADCAST)
        self._field(blob)

    def dm(self, key, line):
        self.parts.append(DM)
        self._field(key.encode())
        self._field(line)

    def control(self, record):
        """One of the operator's commands: ``("kick", key, reason)``,
        ``("announce", text)``, ``("moderation", op)`` or ``("account", op)``."""
        kind = record[0]
        if kind == "kick":
            self.parts.append(KICK)
            self._field(record[1].encode())
            self._field(record[2].encode())
        elif kind == "announce":
            self.parts.append(NOTICE)
            self._field(record[1].encode())
        elif kind == "account":
            self.parts.append(ACCOUNT)
            self._field(accounts.encode_op(record[1]))
        else:
            self.parts.append(MODERATION)
            self._field(moderation.encode_op(record[1]))

    def encode(self):
        return b"".join(self.parts)


def encode_control(records):
    """The ``c`` field of a bus entry: the operator's commands, as
    :meth:`Records.control` takes them."""
    built = Records()
    for record in records:
        built.control(record)
    return built.encode()


def decode_control(data):
    """The operator's commands of a ``c`` field, as :meth:`Records.control`
    takes them. ValueError if it is malformed."""
    records = []
    for record in decode(data):
        if record[0] == KICK:
            records.append(("kick", record[1].decode(), record[2].decode()))
        elif record[0] == NOTICE:
            records.append(("announce", record[1].decode()))
        elif record[0] == MODERATION:
            records.append(("moderation", moderation.decode_op(record[1])))
        elif record[0] == ACCOUNT:
            records.append(("account", accounts.decode_op(record[1])))
        else:
            raise ValueError("not an operator's command: %r" % record[0])
    return records


def decode(data):
    """The records of ``data`` as tuples: (ORIGIN, slot str, n int),
    (BROADCAST, blob), (DM, key str, line). ValueError if it is malformed."""
    records = []
    view = memoryview(data)
    pos, end = 0, len(data)
    while pos < end:
        tag = bytes(view[pos:pos + 1])
        count = _FIELDS.get(tag)
        if count is None:
            raise ValueError("unknown record tag %r" % tag)
        pos += 1
        fields = []
        for _ in range(count):
            if pos + 4 > end:
                raise ValueError("record cut short")
            size = int.from_bytes(view[pos:pos + 4], "big")
            pos += 4
            if pos + size > end:
                raise ValueError("record cut short")
            fields.append(bytes(view[pos:pos + size]))
            pos += size
        if tag == ORIGIN:
            records.append((ORIGIN, fields[0].decode(), int(fields[1])))
        elif tag == DM:
            records.append((DM, fields[0].decode(), fields[1]))
        else:
            records.append((tag,) + tuple(fields))
    return records
