"""The Redis protocol (RESP2), sans-IO: commands to bytes, bytes to replies.

Nothing here touches a socket: :func:`encode` builds the bytes of one
command, and a :class:`Parser` turns received bytes, cut anywhere, back into
replies. That keeps the codec testable with plain function calls and the
connection (:mod:`chatlib.cluster.redis_client`) small.

An error reply is a value, a :class:`RedisError`, not an exception raised:
in a pipeline, one command's error must not cost the replies behind it.
"""

_MAX_LENGTH = 512 << 20      # redis's own limit on a bulk string (proto-max-bulk-len)


class RedisError(Exception):
    """An error reply; ``code`` is its first word (``ERR``, ``NOSCRIPT``, ``WRONGPASS``)."""

    def __init__(self, message):
        super().__init__(message)
        self.message = message
        self.code = message.split(" ", 1)[0]


class ConnectionLost(Exception):
    """The reply of every command still unanswered when its connection went."""


class ProtocolError(Exception):
    """Bytes that are not RESP2: nothing after them can be trusted."""


def encode(*args):
    """One command as a RESP array of bulk strings.

    Arguments are bytes, str (sent as UTF-8), int or float.
    """
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if type(arg) is not bytes:
            if isinstance(arg, str):
                arg = arg.encode()
            elif isinstance(arg, int):
                arg = b"%d" % arg
            elif isinstance(arg, float):
                arg = repr(arg).encode()
            elif not isinstance(arg, bytearray):
                raise TypeError("a redis argument is bytes, str, int or float, not %s"
                                % type(arg).__name__)
        out.append(b"$%d\r\n%b\r\n" % (len(arg), arg))
    return b"".join(out)


class Parser:
    """Replies from a byte stream fed in pieces cut at any byte.

    Types map to Python as: simple string -> str, error -> RedisError,
    integer -> int, bulk string -> bytes, array -> list, null -> None.

    Linear in the bytes fed, however they are cut: the bytes wait in one
    bytearray read from an offset, a line's end is never looked for twice in
    the same bytes, and an array keeps the items already parsed while the
    rest is on its way. After a :class:`ProtocolError` the parser is spent.
    """

    def __init__(self):
        self._buf = bytearray()
        self._scan = 0           # where a "\r\n" may start that was not looked for yet
        self._arrays = []        # arrays being filled, innermost last: (items, size)

    def feed(self, data):
        """Add received bytes; return every reply they complete, in order."""
        buf = self._buf
        buf += data
        arrays = self._arrays
        replies = []
        pos = 0                  # the start of the first reply or item not parsed
        while True:
            end = buf.find(b"\r\n", max(pos, self._scan))
            if end < 0:
                self._scan = max(len(buf) - 1, pos)
                break
            kind = buf[pos]
            line = buf[pos + 1:end]
            after = end + 2
            if kind == 0x24:                                  # $ bulk string
                size = _length(line)
                if size < 0:
                    item = None
                else:
                    stop = after + size
                    if len(buf) < stop + 2:
                        break                                 # the rest is on its way
                    if buf[stop:stop + 2] != b"\r\n":
                        raise ProtocolError("a bulk string longer than its length")
                    item = bytes(buf[after:stop])
                    after = stop + 2
            elif kind == 0x2A:                                # * array
                size = _length(line)
                if size > 0:
                    arrays.append(([], size))
                    pos = after
                    continue
                item = [] if size == 0 else None
            elif kind == 0x2B:                                # + simple string
                item = line.decode("utf-8", "replace")
            elif kind == 0x3A:                                # : integer
                item = _integer(line)
            elif kind == 0x2D:                                # - error
                item = RedisError(line.decode("utf-8", "replace"))
            else:
                raise ProtocolError("unknown reply type %r" % bytes([kind]))
            pos = after
            while arrays:
                items, size = arrays[-1]
                items.append(item)
                if len(items) < size:
                    break
                item = arrays.pop()[0]
            else:
                replies.append(item)
        del buf[:pos]            # cheap: CPython moves a bytearray's start
        self._scan = max(self._scan - pos, 0)
        return replies


def _integer(line):
    try:
        return int(line)
    except ValueError:
        raise ProtocolError("not an integer: %r" % bytes(line[:20])) from None


def _length(line):
    """A bulk string's or an array's length: -1 (null) or up to redis's limit."""
    size = _integer(line)
    if not -1 <= size <= _MAX_LENGTH:
        raise ProtocolError("a length of %d" % size)
    return size
