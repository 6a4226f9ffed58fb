"""Accounts: registered names and their passwords' hashes (sans-IO).

The rules this module keeps:

1. A password is kept only as a salted ``hashlib.scrypt`` hash, in a
   self-describing form (:func:`hash_password`) that carries its own cost,
   so that the cost can be raised later without breaking the old hashes.
   A password is never logged nor put in an error
   message; neither is a stored hash.
2. Checking a password costs tens of milliseconds of CPU and 16 MiB:
   :func:`hash_password` and :func:`verify_password` run only in
   :mod:`chatlib.hasher`'s threads, never on an event loop, and only once
   :class:`Throttle` allowed the guess. A stored hash is read as from a
   stranger (Redis may have been written by anyone): a malformed one, or one
   whose cost is absurd, fails the check before any memory is taken.
3. Every change is an operation, a small tuple (:meth:`Accounts.apply`),
   that travels as a line of tab-separated text (:func:`encode_op`), never a
   pickle, as for the bans (:mod:`chatlib.moderation`); :func:`decode_op`
   checks every field, the hash's shape too.
4. Times in records are wall-clock seconds, passed in (they outlive restarts
   and travel between nodes); the throttle's are any clock that does not go
   back (``time.monotonic()``), passed in too.

Nothing here reads a clock, a file or a socket, nor starts a thread:
:mod:`chatlib.statefile` keeps the accounts on disk (:meth:`Accounts.to_json`).
"""

import base64
import collections
import hashlib
import hmac
import ipaddress
import os
import re
import unicodedata
from typing import NamedTuple, Optional

from chatlib import statefile, textops
from chatlib.protocol import valid_name

ACCOUNTS_FILE = "accounts.json"     # in the state directory (--state-dir), beside bans.json
MIN_PASSWORD = 8                    # characters (not bytes), after NFC normalisation
MAX_PASSWORD_BYTES = 1024           # UTF-8: an attacker cannot make us hash megabytes
SALT_BYTES = 16
MAX_OP_BYTES = 512                  # an encoded operation is never longer (a hash is < 250 bytes)


class ScryptCost(NamedTuple):
    """scrypt's parameters: CPU/memory cost ``n`` (a power of two), block
    size ``r``, parallelism ``p``, and the hash's length in bytes."""
    n: int
    r: int
    p: int
    dklen: int


# 16 MiB (128·n·r), 43 ms of one core a check on the 2-core test machine: slow
# for a guesser, unnoticed at a login (2**13: 21 ms, too cheap; 2**15: 108 ms).
DEFAULT_COST = ScryptCost(n=2 ** 14, r=8, p=1, dklen=32)

# A stored cost may be at most this many times DEFAULT_COST in memory and in
# work: room to raise the cost later, but a tampered record cannot make one
# check allocate or compute much more than an honest one.
_MAX_RAISE = 4
_HASH_FORM = re.compile(r"scrypt\$n=([1-9][0-9]{0,9}),r=([1-9][0-9]{0,4}),p=([1-9][0-9]{0,4})"
                        r"\$([A-Za-z0-9+/=]{1,100})\$([A-Za-z0-9+/=]{1,100})\Z", re.ASCII)


# --- Passwords ------------------------------------------------------------------

def check_new_password(password):
    """Refuse ``password`` for a new account or a change: ValueError
    ``weak-password`` under MIN_PASSWORD characters, ``password-too-long``
    over MAX_PASSWORD_BYTES bytes of UTF-8."""
    password = _normalised(password)
    if len(password) < MIN_PASSWORD:
        raise ValueError("weak-password")
    if len(password.encode("utf-8")) > MAX_PASSWORD_BYTES:
        raise ValueError("password-too-long")


def _normalised(password):
    # NFC: "é" typed as one code point or as "e" and an accent is one password.
    if not isinstance(password, str):
        raise TypeError("a password is a str")
    return unicodedata.normalize("NFC", password)


def hash_password(password, salt=None, cost=DEFAULT_COST):
    """The stored form of ``password``: ``scrypt$n=16384,r=8,p=1$<salt>$<hash>``,
    salt and hash in base64. A random salt unless ``salt`` (bytes) is given.
    CPU-heavy: for a hasher thread, not an event loop."""
    if salt is None:
        salt = os.urandom(SALT_BYTES)
    cost = ScryptCost(*cost)
    if not (isinstance(salt, bytes) and _salt_ok(salt) and _cost_ok(cost)):
        raise ValueError("bad salt or cost")
    return _stored(cost, salt, _scrypt(_normalised(password).encode("utf-8"), salt, cost))


def _stored(cost, salt, digest):
    return "scrypt$n=%d,r=%d,p=%d$%s$%s" % (cost.n, cost.r, cost.p, _b64(salt), _b64(digest))


def decoy_hash():
    """A stored form no password matches, made without hashing: checking a
    guess against it costs what checking a real account costs, so that on
    a closed server the time of an answer does not tell which names exist."""
    return _stored(DEFAULT_COST, os.urandom(SALT_BYTES), os.urandom(DEFAULT_COST.dklen))


def verify_password(password, stored):
    """True if ``password`` is the one ``stored`` (a :func:`hash_password`
    form) was made of, compared in constant time. False, never an exception,
    for a malformed or absurd ``stored``, or a password too long to hash.
    CPU-heavy: for a hasher thread, not an event loop."""
    try:
        cost, salt, expected = _parse_hash(stored)
        data = _normalised(password).encode("utf-8")
        if len(data) > MAX_PASSWORD_BYTES:
            return False
        digest = _scrypt(data, salt, cost)
    except (ValueError, TypeError, MemoryError):
        return False
    return hmac.compare_digest(digest, expected)


def _scrypt(data, salt, cost):
    # OpenSSL refuses more than 32 MiB unless told: the memory scrypt needs
    # for this cost (its V and B arrays), which _cost_ok has bounded.
    maxmem = 128 * cost.r * (cost.n + 2 + cost.p) + 4096
    return hashlib.scrypt(data, salt=salt, n=cost.n, r=cost.r, p=cost.p,
                          maxmem=maxmem, dklen=cost.dklen)


def _parse_hash(stored):
    """``(cost, salt, hash)`` of a stored hash; ValueError if it is not one
    this module would make, or its cost is out of bounds (the message never
    holds the value)."""
    match = _HASH_FORM.match(stored) if isinstance(stored, str) else None
    if match is None:
        raise ValueError("bad password hash")
    n, r, p = (int(match.group(i)) for i in (1, 2, 3))
    salt, digest = _unb64(match.group(4)), _unb64(match.group(5))
    cost = ScryptCost(n, r, p, len(digest))
    if not (_salt_ok(salt) and _cost_ok(cost)):
        raise ValueError("bad password hash")
    return cost, salt, digest


def _cost_ok(cost):
    """True for a cost scrypt takes and within _MAX_RAISE of DEFAULT_COST."""
    default = DEFAULT_COST
    return (all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in cost)
            and cost.n >= 2 and cost.n & (cost.n - 1) == 0
            and cost.n * cost.r <= _MAX_RAISE * default.n * default.r
            and cost.n * cost.r * cost.p <= _MAX_RAISE * default.n * default.r * default.p
            and 16 <= cost.dklen <= 64)


def _salt_ok(salt):
    return 16 <= len(salt) <= 64


def _b64(data):
    return base64.b64encode(data).decode("ascii")


def _unb64(text):
    """Bytes of canonical base64 ``text`` (so that one hash has one form)."""
    try:
        data = base64.b64decode(text, validate=True)
    except ValueError:
        raise ValueError("bad password hash") from None
    if _b64(data) != text:
        raise ValueError("bad password hash")
    return data


# --- Records and operations -----------------------------------------------------

class Account(NamedTuple):
    """The account of the user ``key`` (lower-case name), registered as
    ``name`` at ``created``; ``password`` is the stored hash."""
    key: str
    name: str
    password: str
    created: float
    last_login: Optional[float] = None

    @property
    def op(self):
        """The operation that creates this account (its last login aside)."""
        return ("account", self.key, self.name, self.password, self.created)


_OP_LENGTHS = {"account": 5, "unregister": 2, "seen": 3}
_OP_NUMBERS = {"account": (4,), "seen": (2,)}   # fields that are times


def _name(text):
    if not isinstance(text, str) or not text.isascii() or not valid_name(text.encode()):
        raise ValueError("bad name %r" % (text,))
    return text


def _key(text):
    if _name(text) != text.lower():
        raise ValueError("bad key %r" % (text,))
    return text


def _checked(op):
    """``op`` as :meth:`Accounts.apply` takes it, every field checked;
    ValueError if it is not an operation."""
    kind = op[0] if isinstance(op, (tuple, list)) and op else None
    if not isinstance(kind, str) or _OP_LENGTHS.get(kind) != len(op):
        raise ValueError("not an operation: %r" % (op,))
    if kind == "account":
        _, key, name, stored, created = op
        if _key(key) != _name(name).lower():
            raise ValueError("key %r is not name %r in lower case" % (key, name))
        _parse_hash(stored)
        return (kind, key, name, stored, textops.time_field(created, "created"))
    if kind == "unregister":
        return (kind, _key(op[1]))
    return (kind, _key(op[1]), textops.time_field(op[2], "time"))


def encode_op(op):
    """Operation ``op`` as one line of tab-separated text (:mod:`chatlib.textops`)."""
    return textops.encode(_checked(op))


def decode_op(data):
    """The operation encoded in ``data``; ValueError if it is not one (it
    may come from anyone who can write to Redis)."""
    return _checked(textops.decode(data, MAX_OP_BYTES, _OP_NUMBERS))


# --- The state ------------------------------------------------------------------

class Accounts:
    """The registered names. ``Accounts(ops)`` rebuilds the state from
    :meth:`ops`; that is also all a pickle of it holds."""

    def __init__(self, ops=()):
        self._accounts = {}     # key: Account
        for op in ops:
            self.apply(op)

    def __bool__(self):
        return bool(self._accounts)

    def __len__(self):
        return len(self._accounts)

    def __contains__(self, key):
        return key in self._accounts

    def __repr__(self):
        return "<Accounts: %d>" % len(self._accounts)

    def __reduce__(self):
        return (Accounts, (self.ops(),))

    def get(self, key):
        """The account of the user ``key`` (lower-case name), or None."""
        return self._accounts.get(key)

    def listing(self):
        """Every account, oldest first."""
        return sorted(self._accounts.values(), key=lambda a: (a.created, a.key))

    def apply(self, op):
        """Make the change ``op`` says: ``("account", key, name, stored_hash,
        created)`` creates the account or replaces its name, hash and
        creation time (its last login stays); ``("unregister", key)``;
        ``("seen", key, when)`` records a login, never moving the last one
        back. ValueError if ``op`` is none of these. True if it changed
        anything: the same op twice changes nothing the second time."""
        kind, key, *fields = _checked(op)
        old = self._accounts.get(key)
        if kind == "unregister":
            return self._accounts.pop(key, None) is not None
        if kind == "seen":
            when, = fields
            if old is None or (old.last_login is not None and old.last_login >= when):
                return False
            self._accounts[key] = old._replace(last_login=when)
            return True
        new = Account(key, *fields, last_login=None if old is None else old.last_login)
        self._accounts[key] = new
        return new != old

    def ops(self):
        """The operations that rebuild this state."""
        ops = []
        for account in self.listing():
            ops.append(account.op)
            if account.last_login is not None:
                ops.append(("seen", account.key, account.last_login))
        return ops

    def to_json(self):
        return {"version": 1, "accounts": [a._asdict() for a in self.listing()]}

    @classmethod
    def from_json(cls, obj):
        """The state :meth:`to_json` gave; ValueError naming the entry and
        field if ``obj`` is not one (the file may have been edited by hand)."""
        statefile.check_version(obj, 1)
        entries = obj.get("accounts", [])
        if not isinstance(entries, list):
            raise ValueError("accounts: not a list")
        accounts = cls()
        for i, entry in enumerate(entries):
            try:
                if not isinstance(entry, dict):
                    raise ValueError("not an object")
                account = Account._make(entry.get(field) for field in Account._fields)
                op = _checked(account.op)
                if account.last_login is not None:
                    textops.time_field(account.last_login, "last_login")
                if account.key in accounts:
                    raise ValueError("a second account %r" % (account.key,))
                accounts.apply(op)
                if account.last_login is not None:
                    accounts.apply(("seen", account.key, account.last_login))
            except ValueError as e:
                raise ValueError("accounts[%d]: %s" % (i, e)) from None
        return accounts


# --- Guesses --------------------------------------------------------------------

MAX_FAILURES = 5        # failed checks per address, and per name, in WINDOW...
WINDOW = 60.0           # ...seconds; then no more guesses until the oldest is that old
MAX_TRACKED = 50_000    # addresses, and names: 36 MB at most for both, if all full


class Throttle:
    """Failed password checks per client address and per name, so that a
    guess is refused (:meth:`allowed`) before any hashing is done.

    Each address (an IPv6 one by its /64: one host has a whole /64) and
    each name may fail MAX_FAILURES times in WINDOW seconds. Memory is
    bounded: an address or a name goes once its failures are all older than
    the window, so when failures are only recorded after a hash, the tables
    hold at most the checks of one window (about 1,400 a hasher thread);
    and whatever the caller does, at most ``max_tracked`` addresses and as
    many names, whichever failed least recently dropped first.
    """

    def __init__(self, max_failures=MAX_FAILURES, window=WINDOW, max_tracked=MAX_TRACKED):
        self.max_failures = max_failures
        self.window = window
        self.max_tracked = max_tracked
        # Address group or key: the times of its last failures (at most
        # max_failures, oldest first), least recently failed first.
        self._addresses = collections.OrderedDict()
        self._names = collections.OrderedDict()

    def __len__(self):
        """How many addresses and names are tracked."""
        return len(self._addresses) + len(self._names)

    def allowed(self, address, key, now):
        """True if client ``address`` (as accept() gives it) may try a
        password for the user ``key`` (lower-case name) at ``now``."""
        return min(self.left(address, key, now)) > 0

    def left(self, address, key, now):
        """How many more failures client ``address``, and name ``key``, may
        have in the window at ``now``: (for the address, for the name)."""
        return tuple(self.max_failures - sum(1 for t in table.get(index, ()) if t > now - self.window)
                     for table, index in ((self._addresses, address_group(address)),
                                          (self._names, key)))

    def failed(self, address, key, now):
        """A password tried by client ``address`` for ``key`` at ``now`` was wrong."""
        for table, index in ((self._addresses, address_group(address)), (self._names, key)):
            times = table.pop(index, ())
            table[index] = (times + (now,))[-self.max_failures:]
            while table and (len(table) > self.max_tracked
                             or next(iter(table.values()))[-1] <= now - self.window):
                table.popitem(last=False)

    def succeeded(self, address, key):
        """The right password for ``key``: its failures are forgotten. Not
        the address's: else one who owns an account could guess others'
        passwords from one address, logging in to their own between tries."""
        self._names.pop(key, None)


def address_group(address):
    """What :class:`Throttle` counts a client address ``address`` by: an
    IPv4 address as itself (an IPv4-mapped one too), an IPv6 address by its
    /64, anything else (a Unix socket's) as it is."""
    if ":" not in address:
        return address
    try:
        ip = ipaddress.IPv6Address(address.split("%", 1)[0])
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
