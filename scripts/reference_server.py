#!/usr/bin/env python3
"""A reference server of the protocol: one process, asyncio, for comparisons.

What a skilled Python programmer would write instead of the multi-process
server, and the bar ``compare.py`` measures it against: the README's
protocol (every command, answer and error, the text cleaning, ``--max-line``,
``INFO`` on departure, ``ERR idle-timeout``, ``ERR slow-consumer``, ``ERR
server-shutdown`` on SIGTERM or Ctrl-C), with none of the protection
(flood control, per-address and login limits, HTTP detection), TLS or
cluster mode.

    python3 scripts/reference_server.py --port 4000 [--idle-timeout 600]

It is quick where the work is: ``asyncio.Protocol`` callbacks, no streams;
lines split a read at a time; and every connection's output coalesced into
one write per loop turn. A turn's broadcast lines are kept once, in order,
in a shared list: each recipient gets them joined (the same bytes object
for everyone but their senders) after what it was owed before them, so a
``MSG`` to a thousand users costs one append, not a thousand.
"""

import argparse
import asyncio
import re
import signal
import socket
import sys
import time

NAME = re.compile(rb"[A-Za-z0-9_.\-]{1,32}\Z")
WORD = re.compile(rb"[ \t]*([^ \t]*)[ \t]*(.*)", re.S)
UNSAFE = {c: "\ufffd" for c in [c for c in range(0x20) if c != 0x09] + [0x7F]
          + list(range(0x80, 0xA0)) + list(range(0x202A, 0x202F)) + list(range(0x2066, 0x206A))}
ASCII_UNSAFE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
BLANKS = b" \t"


def clean(text):
    """Control characters, C1, DEL, bidi overrides and invalid UTF-8: U+FFFD."""
    if text.isascii() and ASCII_UNSAFE.search(text) is None:
        return text
    return text.decode("utf-8", "replace").translate(UNSAFE).encode()


class Chat:
    """Everyone's state, and the output of the current loop turn."""

    def __init__(self, loop, args):
        self.loop = loop
        self.args = args
        self.users = {}             # lower-case name -> Connection, oldest login first
        self.connections = set()
        self.turn = []              # this turn's broadcast lines, in order
        self.turn_senders = []      # who sent each (None: an INFO)
        self.owing = set()          # connections with output to write this turn
        self.flush_scheduled = False

    def schedule(self):
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)

    def broadcast(self, sender, line):
        """``line`` to every logged-in user but ``sender``."""
        if not self.turn:
            self.schedule()
        self.turn.append(line)
        self.turn_senders.append(sender)
        if sender is not None:
            sender.own_last = len(self.turn) - 1

    def send(self, conn, line):
        """``line`` to ``conn`` alone, after the broadcasts it is owed."""
        if conn.name is not None and conn.seen < len(self.turn):
            self.catch_up(conn)
        conn.output.append(line)
        self.owing.add(conn)
        self.schedule()

    def catch_up(self, conn, joined=None):
        """The broadcasts since ``conn`` last looked, but its own."""
        start, conn.seen = conn.seen, len(self.turn)
        if conn.own_last is None or conn.own_last < start:
            conn.output.append(joined if start == 0 and joined is not None
                               else b"".join(self.turn[start:]))
        else:
            conn.output.append(b"".join(line for line, who in
                                        zip(self.turn[start:], self.turn_senders[start:])
                                        if who is not conn))
        self.owing.add(conn)

    def flush(self):
        """The end of a loop turn: one write per connection that is owed output."""
        self.flush_scheduled = False
        if self.turn:
            joined = b"".join(self.turn)
            for conn in self.users.values():
                if conn.seen < len(self.turn):
                    self.catch_up(conn, joined)
            self.turn, self.turn_senders = [], []
        for conn in self.users.values():
            conn.seen, conn.own_last = 0, None
        owing, self.owing = self.owing, set()
        for conn in owing:
            if conn.output:
                conn.write_out()

    def sweep(self):
        """Once a second: drop connections idle past --idle-timeout."""
        now = time.monotonic()
        for conn in list(self.connections):
            if now - conn.last_line > self.args.idle_timeout:
                conn.hang_up(b"ERR idle-timeout\n")
        self.loop.call_later(1.0, self.sweep)

    def shutdown(self):
        for conn in list(self.connections):
            conn.hang_up(b"ERR server-shutdown\n", announce=False)
        self.flush()


class Connection(asyncio.Protocol):
    """One client: its half line, its name, what it is owed."""

    def __init__(self, chat):
        self.chat = chat
        self.transport = None
        self.name = None            # bytes, as typed, once logged in
        self.carry = b""
        self.too_long = False       # discarding the rest of a long line
        self.output = []
        self.seen = 0               # how far into the turn's broadcasts it has been served
        self.own_last = None        # the last of this turn's broadcasts it sent
        self.last_line = time.monotonic()
        self.closing = False

    def connection_made(self, transport):
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.chat.connections.add(self)

    def data_received(self, data):
        lines = (self.carry + data).split(b"\n") if self.carry else data.split(b"\n")
        self.carry = lines.pop()
        for line in lines:
            if self.closing:
                return
            if self.too_long:
                self.too_long = False
                continue
            if len(line) + 1 > self.chat.args.max_line:
                self.chat.send(self, b"ERR line-too-long\n")
                continue
            self.last_line = time.monotonic()
            self.command(line[:-1] if line.endswith(b"\r") else line)
        if len(self.carry) + 1 > self.chat.args.max_line:
            if not self.too_long:
                self.chat.send(self, b"ERR line-too-long\n")
            self.too_long, self.carry = True, b""

    def command(self, line):
        word, rest = WORD.match(line).groups()
        verb = word.upper()
        chat = self.chat
        if verb == b"MSG" and self.name is not None:
            text = rest.rstrip(BLANKS)
            if text:
                chat.broadcast(self, b"MSG %s %s\n" % (self.name, clean(text)))
            else:
                chat.send(self, b"ERR empty-message\n")
        elif verb == b"PING":
            chat.send(self, b"PONG\n")
        elif verb == b"DM" and self.name is not None:
            target, text = WORD.match(rest).groups()
            text = text.rstrip(BLANKS)
            to = chat.users.get(target.lower())
            if to is None:
                chat.send(self, b"ERR user-not-found\n")
            elif not text:
                chat.send(self, b"ERR empty-message\n")
            else:
                chat.send(to, b"DM %s %s\n" % (self.name, clean(text)))
        elif verb == b"LOGIN":
            self.login(rest.rstrip(BLANKS))
        elif verb == b"WHO" and self.name is not None:
            chat.send(self, b"".join(b"USER %s\n" % u.name for u in chat.users.values()))
        elif verb == b"QUIT":
            self.hang_up(b"")
        elif verb in (b"MSG", b"DM", b"WHO"):
            chat.send(self, b"ERR not-logged-in\n")
        elif word:
            chat.send(self, b"ERR unknown-command\n")

    def login(self, name):
        chat = self.chat
        if self.name is not None:
            chat.send(self, b"ERR already-logged-in\n")
        elif NAME.match(name) is None:
            chat.send(self, b"ERR invalid-username\n")
        elif name.lower() in chat.users:
            chat.send(self, b"ERR username-taken\n")
        else:
            self.name = name
            self.seen = len(chat.turn)      # nothing broadcast before its login
            chat.users[name.lower()] = self
            chat.send(self, b"OK\n")

    def write_out(self):
        data, self.output = b"".join(self.output), []
        self.transport.write(data)
        if not self.closing and self.transport.get_write_buffer_size() > \
                self.chat.args.max_pending:
            self.hang_up(b"ERR slow-consumer\n")

    def hang_up(self, last_line, announce=True):
        """Send what is owed and ``last_line``, close, tell the others."""
        if self.closing:
            return
        self.closing = True
        chat = self.chat
        if last_line:
            chat.send(self, last_line)
        elif self.name is not None and self.seen < len(chat.turn):
            chat.catch_up(self)
        if self.output:
            self.write_out()
        chat.owing.discard(self)
        self.transport.close()
        self.leave(announce)

    def connection_lost(self, exc):
        self.leave(True)

    def leave(self, announce):
        chat = self.chat
        chat.connections.discard(self)
        if self.name is not None and chat.users.get(self.name.lower()) is self:
            del chat.users[self.name.lower()]
            if announce:
                chat.broadcast(None, b"INFO %s disconnected\n" % self.name)


async def serve(args):
    loop = asyncio.get_running_loop()
    chat = Chat(loop, args)
    server = await loop.create_server(lambda: Connection(chat), args.host, args.port,
                                      reuse_address=True, backlog=4096)
    stopped = loop.create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: stopped.done() or stopped.set_result(None))
    print("listening on %s:%d" % (args.host, server.sockets[0].getsockname()[1]),
          file=sys.stderr, flush=True)
    loop.call_later(1.0, chat.sweep)
    await stopped
    server.close()
    chat.shutdown()
    await asyncio.sleep(0.1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=4000, help="0: a free one (the log says which)")
    p.add_argument("--idle-timeout", type=float, default=60.0)
    p.add_argument("--max-line", type=int, default=4096)
    p.add_argument("--max-pending", type=int, default=1 << 20)
    asyncio.run(serve(p.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
