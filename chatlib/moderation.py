"""Bans and mutes: the chat's, as the operator set them (sans-IO).

The rules this module keeps:

1. A ban's target is a user name (compared in lower case), an address, or a
   CIDR block, always in one canonical form (:func:`parse_target`), so that
   one target is one entry however the operator typed it. A string that
   reads as an IPv4 address is an address, even though it would be a valid
   name too.
2. Times are wall-clock seconds (``time.time()``), passed in as ``now``:
   bans outlive restarts and travel between nodes, where no monotonic clock
   means anything. An entry whose ``expires`` has come never matches, pruned
   or not.
3. Every change is an operation, a small tuple (:meth:`Moderation.apply`),
   and travels as a line of tab-separated text (:func:`encode_op`): never a
   pickle, since anyone who can write to Redis could make a pickle run code
   on every node; :func:`decode_op` checks every field, as from a stranger.
4. Cheap where it is hot: ``bool(moderation)`` is False with nothing set, so
   callers skip it all; :meth:`Moderation.banned_address` costs nothing
   without address bans, and one dict lookup for an IPv4 client with exact
   addresses only.

Nothing here reads a clock, a file or a socket: :mod:`chatlib.statefile`
keeps the state on disk (:meth:`Moderation.to_json`).
"""

import ipaddress
import re
from typing import NamedTuple, Optional

from chatlib import statefile, textops
from chatlib.protocol import valid_name

BANS_FILE = "bans.json"     # in the state directory (--state-dir)
MAX_REASON = 200            # characters of a ban's reason kept
MAX_OP_BYTES = 1024         # an encoded operation is never longer (a reason is at most 800 bytes)

# ASCII: under re.IGNORECASE alone, "ſ" (long s) would match "s".
_DURATION = re.compile(r"([0-9]{1,15})([smhdw])\Z", re.IGNORECASE | re.ASCII)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_MAX_DURATION = 10 * 365 * 86400
_MAPPED_PREFIX = "::ffff:"  # how accept() shows an IPv4 client of a dual-stack listener


# --- What the operator types --------------------------------------------------

def looks_like_duration(text):
    """True if ``text`` is written as a duration (``7d``), valid or not: the
    word after a ban's target is its duration, or the start of its reason."""
    return _DURATION.match(text) is not None


def parse_duration(text):
    """Seconds in ``text``: a positive whole number and a unit, s m h d or w."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError("bad duration %r: use 30s, 30m, 12h, 7d or 2w" % text)
    seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2).lower()]
    if seconds == 0:
        raise ValueError("bad duration %r: it must be more than zero" % text)
    if seconds > _MAX_DURATION:
        raise ValueError("bad duration %r: at most 10 years (for ever: give none)" % text)
    return float(seconds)


def parse_target(text):
    """The canonical form of a ban's target: a name in lower case, an
    address compressed (an IPv4-mapped one as IPv4), a CIDR block as its
    network (``10.1.2.3/8``: ``10.0.0.0/8``; a single address: the address)."""
    return _target(text)[1]


def _target(text):
    """``(kind, canonical form, key in that kind's table)`` of target ``text``;
    kind is ``name``, ``address`` or ``network``."""
    # A zone (fe80::1%eth0) is refused: accept() never gives one, so such a
    # ban would never match.
    if isinstance(text, str) and "%" not in text:
        if "/" in text:
            try:
                network = _network(text)
            except ValueError:
                pass
            else:
                if network.prefixlen == network.max_prefixlen:
                    canonical = str(network.network_address)
                    return "address", canonical, canonical
                return "network", str(network), network
        else:
            try:
                canonical = str(_address(text))
                return "address", canonical, canonical
            except ValueError:
                pass
            if text.isascii() and valid_name(text.encode()):
                key = text.lower()
                return "name", key, key
    raise ValueError("not a name, an address or a CIDR block: %r" % (text,))


def _address(text):
    """IP address ``text`` parsed, IPv4 for an IPv4-mapped one (the same
    client, seen through a dual-stack socket)."""
    if ":" not in text:
        return ipaddress.IPv4Address(text)
    address = ipaddress.IPv6Address(text)
    return address if address.ipv4_mapped is None else address.ipv4_mapped


def _network(text):
    """CIDR block ``text`` as its network, an IPv4-mapped one as IPv4."""
    network = ipaddress.ip_network(text, strict=False)
    mapped = getattr(network.network_address, "ipv4_mapped", None)
    if mapped is not None and network.prefixlen >= 96:
        return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def _name_key(text):
    if not isinstance(text, str) or not text.isascii() or not valid_name(text.encode()):
        raise ValueError("bad name %r" % (text,))
    return text.lower()


def _clean_reason(text):
    """``text`` made safe to show and to put in a record: what is not
    printable (tabs and newlines too: they delimit records) becomes a space,
    runs of spaces one, and it is cut at MAX_REASON characters."""
    if not isinstance(text, str):
        raise ValueError("bad reason %r" % (text,))
    if not text.isprintable():
        text = "".join(c if c.isprintable() else " " for c in text)
    return " ".join(text.split())[:MAX_REASON]


def _expiry(value):
    return None if value is None else textops.time_field(value, "expiry")


# --- Records and operations -----------------------------------------------------

class Ban(NamedTuple):
    """A ban of ``target`` (canonical) set at ``since``, until ``expires``
    (None: until unbanned)."""
    target: str
    expires: Optional[float]
    reason: str
    since: float

    @property
    def op(self):
        """The operation that sets this ban."""
        return ("ban",) + tuple(self)


class Mute(NamedTuple):
    """A mute of the user ``key`` (lower-case name) set at ``since``, until
    ``expires`` (None: until unmuted)."""
    key: str
    expires: Optional[float]
    since: float

    @property
    def op(self):
        """The operation that sets this mute."""
        return ("mute",) + tuple(self)


_OP_LENGTHS = {"ban": 5, "unban": 2, "mute": 4, "unmute": 2}
_OP_NUMBERS = {"ban": (2, 4), "mute": (2, 3)}   # fields that are times, None as "-"


def _checked(op):
    """``op`` as :meth:`Moderation.apply` takes it: every field checked, the
    target canonical, the reason cleaned. ValueError if it is not an operation."""
    kind = op[0] if isinstance(op, (tuple, list)) and op else None
    if not isinstance(kind, str) or _OP_LENGTHS.get(kind) != len(op):
        raise ValueError("not an operation: %r" % (op,))
    if kind in ("ban", "unban"):
        try:
            target = parse_target(op[1])
        except ValueError:
            raise ValueError("bad target %r" % (op[1],)) from None
        if kind == "unban":
            return (kind, target)
        return (kind, target, _expiry(op[2]), _clean_reason(op[3]), textops.time_field(op[4], "since"))
    if kind == "unmute":
        return (kind, _name_key(op[1]))
    return (kind, _name_key(op[1]), _expiry(op[2]), textops.time_field(op[3], "since"))


def encode_op(op):
    """Operation ``op`` as one line of tab-separated text (:mod:`chatlib.textops`)."""
    return textops.encode(_checked(op))


def decode_op(data):
    """The operation encoded in ``data``; ValueError if it is not one (it
    may come from anyone who can write to Redis)."""
    return _checked(textops.decode(data, MAX_OP_BYTES, _OP_NUMBERS))


def _live(record, now):
    return record.expires is None or now < record.expires


# --- The state ------------------------------------------------------------------

class Moderation:
    """The chat's bans and mutes. ``Moderation(ops)`` rebuilds one from
    :meth:`ops`; that is also all a pickle of it holds."""

    def __init__(self, ops=()):
        self._names = {}        # key: Ban
        self._addresses = {}    # canonical address: Ban
        self._networks = {}     # ipaddress network: Ban
        self._lengths = None    # (IP version, prefix length) of those networks
        self._mutes = {}        # key: Mute
        for op in ops:
            self.apply(op)

    def __bool__(self):
        return bool(self._names or self._addresses or self._networks or self._mutes)

    def __repr__(self):
        return "<Moderation: %d bans, %d mutes>" % (
            len(self._names) + len(self._addresses) + len(self._networks), len(self._mutes))

    def __reduce__(self):
        return (Moderation, (self.ops(),))

    @property
    def has_address_bans(self):
        return bool(self._addresses or self._networks)

    @property
    def has_mutes(self):
        return bool(self._mutes)

    # Changes.

    def ban(self, target, expires, reason, now):
        """Ban ``target`` from ``now`` until ``expires`` (None: until
        unbanned), in place of any ban of it; the ban."""
        ban = Ban(*_checked(("ban", target, expires, reason, now))[1:])
        self._set_ban(ban)
        return ban

    def unban(self, target):
        """Lift the ban of ``target``; False if there was none."""
        return self.apply(("unban", target))

    def mute(self, key, expires, now):
        """Mute the user ``key`` from ``now`` until ``expires``; the mute."""
        mute = Mute(*_checked(("mute", key, expires, now))[1:])
        _set(self._mutes, mute.key, mute)
        return mute

    def unmute(self, key):
        """Lift the mute of ``key``; False if there was none."""
        return self.apply(("unmute", key))

    def apply(self, op):
        """Make the change ``op`` says: ``("ban", target, expires, reason,
        since)``, ``("unban", target)``, ``("mute", key, expires, since)`` or
        ``("unmute", key)``; ValueError if it is none of these. True if it
        changed anything: the same op twice changes nothing the second time."""
        kind, key, *fields = _checked(op)
        self._lengths = None
        if kind == "ban":
            return self._set_ban(Ban(key, *fields))
        if kind == "mute":
            return _set(self._mutes, key, Mute(key, *fields))
        table, index = self._place(key) if kind == "unban" else (self._mutes, key)
        return table.pop(index, None) is not None

    def _place(self, target):
        """The table that holds the ban of ``target``, and its key there."""
        kind, _, index = _target(target)
        return {"name": self._names, "address": self._addresses,
                "network": self._networks}[kind], index

    def _set_ban(self, ban):
        self._lengths = None
        return _set(*self._place(ban.target), ban)

    def prune(self, now):
        """Drop the entries expired by ``now``; True if any went."""
        pruned = False
        self._lengths = None
        for table in (self._names, self._addresses, self._networks, self._mutes):
            expired = [index for index, record in table.items() if not _live(record, now)]
            for index in expired:
                del table[index]
            pruned = pruned or bool(expired)
        return pruned

    # Questions.

    def banned_name(self, key, now):
        """The live ban of the user ``key`` (lower-case name), or None."""
        ban = self._names.get(key)
        return ban if ban is not None and _live(ban, now) else None

    def banned_address(self, ip, now):
        """The live ban that covers client address ``ip`` (as accept() gives
        it, IPv4-mapped or not), or None. Parsed at most once, and only for
        IPv6 or when there are networks to match."""
        if not (self._addresses or self._networks):
            return None
        if ip.startswith(_MAPPED_PREFIX) and "." in ip:
            ip = ip[len(_MAPPED_PREFIX):]
        address = None
        if ":" in ip or self._networks:
            try:
                address = _address(ip)
            except ValueError:
                return None         # not an IP address: no ban can cover it
            if ":" in ip:
                ip = str(address)
        ban = self._addresses.get(ip)
        if ban is not None and _live(ban, now):
            return ban
        if self._networks:
            # One lookup per prefix length in use, however many blocks are banned.
            if self._lengths is None:
                self._lengths = {(n.version, n.prefixlen) for n in self._networks}
            bits, number = address.max_prefixlen, int(address)
            network_class = ipaddress.IPv4Network if address.version == 4 else ipaddress.IPv6Network
            for version, length in self._lengths:
                if version == address.version:
                    block = network_class((number >> (bits - length) << (bits - length), length))
                    ban = self._networks.get(block)
                    if ban is not None and _live(ban, now):
                        return ban
        return None

    def muted(self, key, now):
        mute = self._mutes.get(key)
        return mute is not None and _live(mute, now)

    def bans_listing(self, now):
        """The live bans, oldest first."""
        return [ban for ban in self._sorted_bans() if _live(ban, now)]

    def mutes_listing(self, now):
        """The live mutes, oldest first."""
        return [mute for mute in self._sorted_mutes() if _live(mute, now)]

    def _sorted_bans(self):
        return sorted([*self._names.values(), *self._addresses.values(),
                       *self._networks.values()], key=lambda ban: (ban.since, ban.target))

    def _sorted_mutes(self):
        return sorted(self._mutes.values(), key=lambda mute: (mute.since, mute.key))

    def _records(self):
        return self._sorted_bans() + self._sorted_mutes()

    # The whole state.

    def ops(self):
        """The operations that rebuild this state, expired entries and all."""
        return [record.op for record in self._records()]

    def to_json(self):
        return {"version": 1,
                "bans": [ban._asdict() for ban in self._sorted_bans()],
                "mutes": [mute._asdict() for mute in self._sorted_mutes()]}

    @classmethod
    def from_json(cls, obj):
        """The state :meth:`to_json` gave; ValueError naming the entry and
        field if ``obj`` is not one (the file may have been edited by hand)."""
        statefile.check_version(obj, 1)
        moderation = cls()
        for section, record in (("bans", Ban), ("mutes", Mute)):
            entries = obj.get(section, [])
            if not isinstance(entries, list):
                raise ValueError("%s: not a list" % section)
            for i, entry in enumerate(entries):
                try:
                    if not isinstance(entry, dict):
                        raise ValueError("not an object")
                    # A missing reason is none; a missing expiry: for ever.
                    moderation.apply(record._make(
                        entry.get(field, "" if field == "reason" else None)
                        for field in record._fields).op)
                except ValueError as e:
                    raise ValueError("%s[%d]: %s" % (section, i, e)) from None
        return moderation


def _set(table, index, record):
    """Put ``record`` in ``table``; True if that changed it."""
    if table.get(index) == record:
        return False
    table[index] = record
    return True
