"""The chat protocol, sans-IO: bytes in, commands and reply lines out.

Nothing here touches a socket, a clock or a process, in the style of ``h11``:
the worker feeds received bytes to a :class:`LineReader`, hands each line to
:func:`parse_line` and writes the bytes the ``*_line`` helpers build (a read
of nothing but plain ``MSG`` lines goes to :func:`msg_block` whole). That
keeps every rule of the protocol (the README's protocol section) testable with plain function calls.

Text stays ``bytes`` end to end: a line is decoded only when it is not pure
ASCII, so the common case costs no codec round trip.
"""

import re
from collections import namedtuple

from chatlib import telnet

# --- Commands a client line can turn into --------------------------------

Login = namedtuple("Login", "name password", defaults=(None,))   # name: str, validated;
                                               # password: str or None
Register = namedtuple("Register", "password")  # password: str, not yet judged
Password = namedtuple("Password", "password")  # a new one, the same
Msg = namedtuple("Msg", "text")                # text: bytes, cleaned, non-empty
Dm = namedtuple("Dm", "target text")           # target: str (valid name), text: bytes
Who = namedtuple("Who", "")
Ping = namedtuple("Ping", "")
Quit = namedtuple("Quit", "")
Reply = namedtuple("Reply", "data")            # answered at once, e.g. an ERR line
Hangup = namedtuple("Hangup", "data")          # answered, then the connection closes

WHO, PING, QUIT = Who(), Ping(), Quit()

# --- Lines the server sends ------------------------------------------------

OK = b"OK\n"
PONG = b"PONG\n"
ERR_USERNAME_TAKEN = b"ERR username-taken\n"
ERR_INVALID_USERNAME = b"ERR invalid-username\n"
ERR_ALREADY_LOGGED_IN = b"ERR already-logged-in\n"
ERR_NOT_LOGGED_IN = b"ERR not-logged-in\n"
ERR_EMPTY_MESSAGE = b"ERR empty-message\n"
ERR_USER_NOT_FOUND = b"ERR user-not-found\n"
ERR_UNKNOWN_COMMAND = b"ERR unknown-command\n"
ERR_LINE_TOO_LONG = b"ERR line-too-long\n"
ERR_IDLE_TIMEOUT = b"ERR idle-timeout\n"
ERR_SERVER_FULL = b"ERR server-full\n"
ERR_SLOW_CONSUMER = b"ERR slow-consumer\n"
ERR_SERVER_SHUTDOWN = b"ERR server-shutdown\n"
ERR_FLOOD = b"ERR flood\n"
ERR_LOGIN_TIMEOUT = b"ERR login-timeout\n"
ERR_TOO_MANY_CONNECTIONS = b"ERR too-many-connections\n"
ERR_NOT_A_CHAT_CLIENT = b"ERR not-a-chat-client\n"
ERR_UNAVAILABLE = b"ERR unavailable\n"      # cluster mode: Redis cannot be reached
ERR_BANNED = b"ERR banned\n"
ERR_MUTED = b"ERR muted\n"
ERR_BAD_PASSWORD = b"ERR bad-password\n"
ERR_TOO_MANY_ATTEMPTS = b"ERR too-many-attempts\n"
ERR_TLS_REQUIRED = b"ERR tls-required\n"
ERR_ALREADY_REGISTERED = b"ERR already-registered\n"
ERR_WEAK_PASSWORD = b"ERR weak-password\n"
ERR_REGISTRATION_CLOSED = b"ERR registration-closed\n"
ERR_NOT_REGISTERED = b"ERR not-registered\n"


def msg_line(sender, text):
    """``MSG <sender> <text>`` as delivered; sender and text are bytes."""
    return b"MSG %s %s\n" % (sender, text)


def dm_line(sender, text):
    return b"DM %s %s\n" % (sender, text)


def user_lines(names):
    """The answer to ``WHO``: one ``USER`` line per name, in the given order."""
    return b"".join([b"USER %s\n" % n.encode() for n in names])


def info_disconnected(name):
    return b"INFO %s disconnected\n" % name.encode()


def err_kicked(reason=""):
    """``ERR kicked``, then `` REASON`` when the operator gave one (str)."""
    if not reason:
        return b"ERR kicked\n"
    return b"ERR kicked %s\n" % clean_text(reason.encode())


def notice_line(text):
    """An operator's announcement (str), cleaned like any text."""
    return b"NOTICE %s\n" % clean_text(text.encode())


# --- Names and text ----------------------------------------------------------

_NAME = re.compile(rb"[A-Za-z0-9_.\-]{1,32}\Z")


def valid_name(name):
    """True for 1 to 32 characters of ``A-Z a-z 0-9 _ - .`` (bytes)."""
    return _NAME.match(name) is not None


# Control characters but TAB, DEL, C1 controls, bidi overrides and isolates.
_UNSAFE_CODES = ([c for c in range(0x20) if c != 0x09] + [0x7F]
                 + list(range(0x80, 0xA0))
                 + list(range(0x202A, 0x202F)) + list(range(0x2066, 0x206A)))
_UNSAFE_TO_FFFD = {c: "\ufffd" for c in _UNSAFE_CODES}
_ASCII_UNSAFE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def clean_text(text):
    """Replace what could drive a terminal or reorder text with U+FFFD.

    Input is the raw bytes of a message; output is UTF-8 bytes. Bytes that
    are not valid UTF-8 become U+FFFD too, so the result is always valid.
    """
    if text.isascii():
        if _ASCII_UNSAFE.search(text) is None:
            return text                       # the hot path: nothing to do
        return text.decode("ascii").translate(_UNSAFE_TO_FFFD).encode()
    return text.decode("utf-8", "replace").translate(_UNSAFE_TO_FFFD).encode()


# --- Lines -------------------------------------------------------------------

_WS = b" \t"
# Command word, then the rest of the line; whitespace is space and TAB only.
_SPLIT_WORD = re.compile(rb"[ \t]*([^ \t]*)[ \t]*(.*)", re.S)
# An HTTP request line: somebody pointed a browser or a proxy at the port.
_HTTP_REQUEST = re.compile(rb"[A-Z]+ \S+ HTTP/\d(\.\d)?\Z")
# How a TLS handshake record starts (a ClientHello): a TLS client at the
# plaintext port.
_TLS_HANDSHAKE = b"\x16\x03"


def looks_like_tls(data):
    """True if ``data`` starts like a TLS handshake record (a ClientHello)."""
    return data[:2] == _TLS_HANDSHAKE


def parse_line(line, logged_in):
    """Turn one client line (no ``\\n``, ``\\r`` already removed) into a command.

    Returns ``None`` for a blank line, which gets no answer. The order of the
    checks is the contract's: ``already-logged-in`` and ``not-logged-in`` win
    over any problem with the arguments.
    """
    if line == b"PING":
        return PING                      # a keep-alive, the commonest line of all
    if line[:4] == b"MSG " and logged_in:
        # The hot path, a message typed the usual way: no regex split, no
        # upper-casing (figures: docs/BENCHMARKS.md).
        text = line[4:].strip(_WS)
        if text:
            return Msg(clean_text(text))
    word, rest = _SPLIT_WORD.match(line).groups()
    if not word:
        return None
    verb = word.upper()
    if verb == b"MSG":
        if not logged_in:
            return Reply(ERR_NOT_LOGGED_IN)
        text = rest.rstrip(_WS)
        if not text:
            return Reply(ERR_EMPTY_MESSAGE)
        return Msg(clean_text(text))
    if verb == b"PING":
        return PING
    if verb == b"DM":
        if not logged_in:
            return Reply(ERR_NOT_LOGGED_IN)
        target, text = _SPLIT_WORD.match(rest).groups()
        text = text.rstrip(_WS)
        if not text:
            return Reply(ERR_EMPTY_MESSAGE)
        if not valid_name(target):
            return Reply(ERR_USER_NOT_FOUND)   # nobody can have that name
        return Dm(target.decode("ascii"), clean_text(text))
    if verb == b"WHO":
        return WHO if logged_in else Reply(ERR_NOT_LOGGED_IN)
    if verb == b"LOGIN":
        if logged_in:
            return Reply(ERR_ALREADY_LOGGED_IN)
        # A second word is a password (the rest of the line, trimmed); the
        # broker decides whether one means anything (README: "Accounts").
        name, password = _SPLIT_WORD.match(rest).groups()
        if not valid_name(name):
            return Reply(ERR_INVALID_USERNAME)
        password = password.rstrip(_WS)
        return Login(name.decode("ascii"), _secret(password) if password else None)
    if verb == b"REGISTER" or verb == b"PASSWORD":
        if not logged_in:
            return Reply(ERR_NOT_LOGGED_IN)
        password = rest.rstrip(_WS)
        return (Register if verb == b"REGISTER" else Password)(_secret(password))
    if verb == b"QUIT":
        return QUIT
    if not logged_in and (_HTTP_REQUEST.match(line) or looks_like_tls(line)):
        return Hangup(ERR_NOT_A_CHAT_CLIENT)
    return Reply(ERR_UNKNOWN_COMMAND)


def _secret(data):
    """A password's bytes as text (bytes that are not UTF-8 as U+FFFD)."""
    return data.decode("utf-8", "replace")


# What a line that needs no cleaning is made of: printable ASCII and TAB
# (and the \n that joins the lines of a block).
_PLAIN_BYTES = bytes(range(0x20, 0x7F)) + b"\t\n"


def msg_block(lines, sender):
    """The delivered ``MSG`` lines for ``lines``, if all are plain ``MSG``s, else None.

    A flooding client sends reads full of nothing but ``MSG <text>``. Doing
    a whole read with a few bytes operations that run in C, instead of a
    Python loop over :func:`parse_line` and :func:`msg_line`, is several
    times cheaper per line (figures: docs/BENCHMARKS.md). The checks
    refuse anything unusual (lower case, whitespace to strip, a byte to
    clean, a line too long, any other command): those reads go line by line
    through :func:`parse_line`, which defines the result. ``sender`` is the
    logged-in sender's name (bytes).
    """
    try:
        block = b"\n".join(lines)
    except TypeError:                         # a TOO_LONG among them
        return None
    if (not block.startswith(b"MSG ")
            or block.count(b"\nMSG ") != len(lines) - 1    # every line a MSG
            or block.translate(None, _PLAIN_BYTES)         # nothing to clean
            or b"MSG  " in block or b"MSG \t" in block     # nothing to strip
            or b" \n" in block or b"\t\n" in block or block.endswith((b" ", b"\t"))):
        return None
    head = b"MSG " + sender + b" "
    return head + block[4:].replace(b"\nMSG ", b"\n" + head) + b"\n"


TOO_LONG = object()
"""Yielded by :class:`LineReader` in place of a line over the limit."""


class LineReader:
    """Split a byte stream into lines, enforcing ``max_line``, and take
    telnet's commands out of it.

    ``max_line`` counts every byte up to and including the ``\\n``. A line
    over it is dropped up to its ``\\n`` (buffering nothing meanwhile) and
    reported as :data:`TOO_LONG` when that ``\\n`` arrives, so a client
    cannot make the server hold more than ``max_line`` bytes for it (and a
    telnet command cut short).

    Telnet's commands (:mod:`chatlib.telnet`) go wherever the bytes came
    from, plaintext or TLS. What they ask for, a ``telnet.Answer`` or
    ``telnet.INTERRUPT``, takes their place among the lines, so that it
    runs in the order it was sent. A telnet command cut short by the end
    of a read is kept after the start of the line, to be scanned again
    with the next read; so is a line that holds a 0xff byte of text, whose
    first ``_scanned`` bytes are then known to be text already. Either way
    the next read, with what is kept in front of it, holds a 0xff byte:
    exactly when there is telnet's work to do, so a read without one costs
    a single ``0xFF in data`` for all this.
    """

    __slots__ = ("max_line", "_partial", "_discarding", "_scanned")

    def __init__(self, max_line):
        self.max_line = max_line
        self._partial = b""
        self._discarding = False
        self._scanned = 0       # 0 unless _partial starts with text holding a 0xff

    def feed(self, data, text_only=False):
        """Return the complete lines in ``data`` (without ``\\r\\n``/``\\n``),
        and what telnet's commands among them ask for.

        ``text_only``: ``data`` is text out of ``telnet.scan`` already, its
        0xff bytes are text (see :meth:`_feed_telnet`).
        """
        if self._partial:
            data = self._partial + data
        # An int: ``b"\xff" in data`` first tries its bytes as an int and
        # pays for the exception, ten times the cost of the search.
        if 0xFF in data and not text_only:
            return self._feed_telnet(data)
        lines = data.split(b"\n")
        tail = lines.pop()
        limit = self.max_line - 1             # bytes allowed before the \n
        if self._discarding and lines:
            lines[0] = TOO_LONG
            self._discarding = False
        # Most reads have neither a \r nor a line too long, and two checks in
        # C say so; only the others take the loop over every line.
        if lines and (lines[0] is TOO_LONG or b"\r" in data or max(map(len, lines)) > limit):
            for i, line in enumerate(lines):
                if line is TOO_LONG:
                    continue
                if len(line) > limit:
                    lines[i] = TOO_LONG
                elif line[-1:] == b"\r":
                    lines[i] = line[:-1]
        if len(tail) > limit:
            self._discarding = True
            tail = b""
        elif self._discarding:
            tail = b""
        self._partial = tail
        return lines

    def _feed_telnet(self, data):
        """:meth:`feed` for bytes with telnet's commands in them: the text
        between the commands is split as any other, with the commands'
        answers and interrupts in their places.

        ``data`` starts with what was kept: its first ``_scanned`` bytes are
        text (a text without a 0xff byte may be scanned again, unchanged).
        """
        scanned = self._scanned
        self._partial = data[:scanned]
        pieces, unfinished = telnet.scan(data[scanned:])
        items = []
        for piece in pieces:
            if type(piece) is bytes:
                items += self.feed(piece, text_only=True)
            else:
                items.append(piece)
        text = self._partial
        self._scanned = len(text) if b"\xff" in text else 0
        self._partial = text + unfinished
        return items

    def state(self):
        """What it holds between reads, as plain data (chatlib.upgrade.state)."""
        return self._partial, self._discarding, self._scanned

    def restore(self, state):
        self._partial, self._discarding, self._scanned = state

    @property
    def buffered(self):
        """Bytes held for a line not yet complete (and a telnet command cut
        short: at most ``max_line + 3`` in all)."""
        return len(self._partial)
