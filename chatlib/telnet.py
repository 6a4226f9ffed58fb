"""Telnet's commands in a client's byte stream, sans-IO.

``telnet`` speaks the telnet protocol (RFC 854) on any port: Ctrl-C sends
``IAC IP IAC DO TIMING-MARK`` (``ff f4 ff fd 06``), after which telnet shows
nothing until the timing mark is answered; clients in telnet mode (PuTTY's)
may negotiate options as soon as they connect. Taken as text, those bytes
would turn the next line into ``ERR unknown-command``. Nothing here touches a
socket: :func:`scan` splits received bytes into text and what the commands
in them ask for. The line reader (``chatlib.protocol.LineReader``) calls it
only for a read with a 0xff byte in it.

The rules:

1. IAC (0xff) starts a command; ``IAC IAC`` is one 0xff byte of text.
2. Every option is refused: ``DO x`` gets ``WONT x``, ``WILL x`` gets
   ``DONT x``. ``WONT x`` and ``DONT x`` get nothing: we are in no mode to
   leave, and answering them could loop. ``DO TIMING-MARK`` is the
   exception: it gets ``WILL TIMING-MARK``, RFC 860's answer, which enters
   no mode.
3. ``IAC IP`` (Interrupt Process) is :data:`INTERRUPT`: the session ends.
4. Between ``IAC SB`` and ``IAC SE`` text is an option's parameters, and
   dropped; commands there still count.
5. Any other command (IAC and one byte from SE up: NOP, BRK, AYT...) is
   dropped. IAC before a byte below SE is no command, and both are text (a
   client that is not telnet sent a byte that is not UTF-8: it becomes
   U+FFFD, as any other would).
6. A command cut short by the end of the bytes is handed back unread, to be
   put in front of the next ones: a command may be split anywhere.
"""

from collections import namedtuple

IAC, DONT, DO, WONT, WILL, SB, IP, SE = 0xFF, 0xFE, 0xFD, 0xFC, 0xFB, 0xFA, 0xF4, 0xF0
TIMING_MARK = 6                             # RFC 860

Answer = namedtuple("Answer", "data")       # bytes telnet is owed, to send as they are
Interrupt = namedtuple("Interrupt", "")
INTERRUPT = Interrupt()                     # IAC IP: Ctrl-C

_IN_SUBNEGOTIATION = bytes([IAC, SB])       # what to put back for a cut IAC SB ... IAC SE


def answer(verb, option):
    """What we say to ``IAC verb option`` (WILL, WONT, DO, DONT): bytes or None."""
    if verb == DO:
        return bytes([IAC, WILL if option == TIMING_MARK else WONT, option])
    if verb == WILL:
        return bytes([IAC, DONT, option])
    return None


def scan(data):
    """Split ``data`` into text and telnet's commands: ``(pieces, unfinished)``.

    ``pieces`` are in stream order: text (bytes, never empty, ``IAC IAC``
    made one 0xff) and, where a command asks for something, an
    :class:`Answer` or :data:`INTERRUPT`. ``unfinished`` is the command the
    bytes end in the middle of (b"" if none), to be scanned again with the
    bytes that follow it.
    """
    pieces = []
    text = []                        # text since the last answer or interrupt
    in_subnegotiation = False
    end = len(data)
    pos = 0
    while True:
        iac = data.find(b"\xff", pos)
        if iac < 0:
            iac = end
        if iac > pos and not in_subnegotiation:
            text.append(data[pos:iac])
        if iac + 1 >= end or (data[iac + 1] in (WILL, WONT, DO, DONT) and iac + 2 >= end):
            break                    # no command, or the last one is cut short
        code = data[iac + 1]
        pos = iac + 2
        if code in (WILL, WONT, DO, DONT):
            reply = answer(code, data[iac + 2])
            pos += 1
            if reply is not None:
                _close_text(pieces, text)
                pieces.append(Answer(reply))
        elif code == IAC:
            if not in_subnegotiation:
                text.append(b"\xff")
        elif code < SE:
            if not in_subnegotiation:
                text.append(data[iac:pos])
        elif code == SB:
            in_subnegotiation = True
        elif code == SE:
            in_subnegotiation = False
        elif code == IP:
            _close_text(pieces, text)
            pieces.append(INTERRUPT)
    _close_text(pieces, text)
    unfinished = data[iac:]
    if in_subnegotiation:
        unfinished = _IN_SUBNEGOTIATION + unfinished
    return pieces, unfinished


def _close_text(pieces, text):
    """Move the text gathered so far into ``pieces``, as one piece."""
    if text:
        pieces.append(b"".join(text))
        text.clear()
