"""Telnet clients: Ctrl-C, option negotiation, commands cut anywhere.

The sans-IO part (``chatlib.telnet.scan`` and the line reader around it) is
tested with plain calls, byte by byte; the server with the bytes GNU telnet
sends over real sockets, plaintext and TLS; and the real ``telnet`` program
in a ``tmux`` pane, where it is installed (skipped, saying so, where not).
"""

import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

from support import IO_TIMEOUT, ROOT, TestCase, receive, self_signed
from test_tls import TlsClient
from scripts.tlsclient import client_context as any_certificate

sys.path.insert(0, ROOT)
from chatlib import telnet                                      # noqa: E402
from chatlib.protocol import TOO_LONG, LineReader               # noqa: E402
from chatlib.telnet import INTERRUPT, Answer                    # noqa: E402

IAC, DONT, DO, WONT, WILL, SB, SE = b"\xff", b"\xfe", b"\xfd", b"\xfc", b"\xfb", b"\xfa", b"\xf0"
IP, BRK, NOP, AYT = b"\xf4", b"\xf3", b"\xf1", b"\xf6"
ECHO, SGA, TM, NAWS, LINEMODE = b"\x01", b"\x03", b"\x06", b"\x1f", b"\x22"
CTRL_C = IAC + IP + IAC + DO + TM               # what telnet sends for Ctrl-C
WILL_TM = IAC + WILL + TM
FFFD = "\ufffd"


def scan_in_pieces(data, cuts):
    """``telnet.scan`` over ``data`` cut at ``cuts``, carrying what is
    unfinished, as a reader does; adjacent text joined."""
    pieces, unfinished, start = [], b"", 0
    for end in list(cuts) + [len(data)]:
        got, unfinished = telnet.scan(unfinished + data[start:end])
        pieces += got
        start = end
    joined = []
    for piece in pieces:
        if type(piece) is bytes and joined and type(joined[-1]) is bytes:
            joined[-1] += piece
        else:
            joined.append(piece)
    return joined, unfinished


def feed_in_pieces(data, cuts, max_line=4096):
    reader, items, start = LineReader(max_line), [], 0
    for end in list(cuts) + [len(data)]:
        items += reader.feed(data[start:end])
        start = end
    return items, reader


def telnet_stream(rng, n):
    """Random text and telnet commands (0xff on every side of everything)."""
    parts = []
    for _ in range(n):
        r = rng.random()
        if r < 0.3:
            parts.append(rng.choice([b"PING\r\n", b"MSG hi\n", b"LOG", b"IN a\r\n", b"\n", b"x" * 20]))
        elif r < 0.5:
            parts.append(IAC + rng.choice([DO, DONT, WILL, WONT]) + bytes([rng.randrange(256)]))
        elif r < 0.6:
            parts.append(IAC + SB + bytes(rng.randrange(256) for _ in range(rng.randrange(5)))
                         .replace(IAC, IAC + IAC) + IAC + SE)
        elif r < 0.7:
            parts.append(IAC + IAC)
        elif r < 0.8:
            parts.append(IAC + rng.choice([IP, BRK, NOP, AYT, SE, b"a", b"\n", b"\x00"]))
        else:
            parts.append(bytes(rng.randrange(256) for _ in range(rng.randrange(8))))
    return b"".join(parts)


# -- the sans-IO part -----------------------------------------------------------

class Scan(unittest.TestCase):
    """``chatlib.telnet.scan``, rule by rule."""

    def test_text_alone(self):
        self.assertEqual(telnet.scan(b"PING\r\n"), ([b"PING\r\n"], b""))

    def test_ctrl_c_is_an_interrupt_and_the_timing_mark_is_answered(self):
        self.assertEqual(telnet.scan(b"MSG a" + CTRL_C + b"rest"),
                         ([b"MSG a", INTERRUPT, Answer(WILL_TM), b"rest"], b""))

    def test_every_option_is_refused(self):
        for option in range(256):
            o = bytes([option])
            answer = WILL_TM if o == TM else IAC + WONT + o
            self.assertEqual(telnet.scan(IAC + DO + o), ([Answer(answer)], b""))
            self.assertEqual(telnet.scan(IAC + WILL + o), ([Answer(IAC + DONT + o)], b""))
            self.assertEqual(telnet.scan(IAC + WONT + o), ([], b""))
            self.assertEqual(telnet.scan(IAC + DONT + o), ([], b""))

    def test_iac_iac_is_one_0xff_of_text(self):
        self.assertEqual(telnet.scan(b"a" + IAC + IAC + b"b"), ([b"a\xffb"], b""))
        self.assertEqual(telnet.scan(IAC * 4), ([b"\xff\xff"], b""))

    def test_subnegotiation_is_dropped(self):
        naws = IAC + SB + NAWS + b"\x00\x50" + IAC + IAC + b"\x18" + IAC + SE
        self.assertEqual(telnet.scan(b"LOG" + naws + b"IN a\n"), ([b"LOGIN a\n"], b""))
        # Commands inside still count.
        self.assertEqual(telnet.scan(IAC + SB + b"x" + IAC + DO + ECHO + b"y" + IAC + SE + b"z"),
                         ([Answer(IAC + WONT + ECHO), b"z"], b""))

    def test_other_commands_are_dropped(self):
        for code in range(0xF0, 0xFF):
            if bytes([code]) not in (IP, SB) and code not in range(0xFB, 0xFF):
                self.assertEqual(telnet.scan(b"a" + IAC + bytes([code]) + b"b"), ([b"ab"], b""))

    def test_iac_before_a_byte_that_is_no_command_is_text(self):
        for code in (0x00, 0x0A, 0x41, 0x80, 0xEF):
            data = b"a" + IAC + bytes([code]) + b"b"
            self.assertEqual(telnet.scan(data), ([data], b""))

    def test_a_command_cut_short_is_handed_back(self):
        for data, pieces, unfinished in [
                (b"ab" + IAC, [b"ab"], IAC),
                (b"ab" + IAC + DO, [b"ab"], IAC + DO),
                (IAC + SB + b"junk", [], IAC + SB),
                (IAC + SB + b"junk" + IAC, [], IAC + SB + IAC),
                (IAC + SB + IAC + WILL, [], IAC + SB + IAC + WILL)]:
            self.assertEqual(telnet.scan(data), (pieces, unfinished), data)

    def test_cut_at_every_byte(self):
        rng = random.Random(1)
        streams = [b"PING\r\n" + CTRL_C, IAC + SB + NAWS + b"\x00P" + IAC + IAC + IAC + SE + b"ok",
                   b"caf" + IAC + IAC + b"\n" + IAC + IAC + IAC + DO + TM]
        streams += [telnet_stream(rng, 30) for _ in range(40)]
        for data in streams:
            whole = scan_in_pieces(data, [])
            self.assertEqual(scan_in_pieces(data, range(1, len(data))), whole, data)
            for i in range(len(data) + 1):
                self.assertEqual(scan_in_pieces(data, [i]), whole, (data, i))


class Reader(unittest.TestCase):
    """The line reader with telnet's commands in the stream."""

    def test_answers_and_interrupts_take_their_place_among_the_lines(self):
        data = (IAC + WILL + NAWS + IAC + SB + NAWS + b"\x00\x50\x00\x18" + IAC + SE
                + IAC + DO + ECHO + b"LOGIN ada\r\nPING\r\n" + CTRL_C + b"MSG late\r\n")
        self.assertEqual(LineReader(4096).feed(data),
                         [Answer(IAC + DONT + NAWS), Answer(IAC + WONT + ECHO), b"LOGIN ada",
                          b"PING", INTERRUPT, Answer(WILL_TM), b"MSG late"])

    def test_an_answer_inside_a_line_comes_before_it(self):
        self.assertEqual(LineReader(4096).feed(b"PI" + IAC + DO + SGA + b"NG\n"),
                         [Answer(IAC + WONT + SGA), b"PING"])

    def test_the_same_items_however_the_bytes_are_cut(self):
        rng = random.Random(2)
        streams = [b"MSG caf" + IAC + IAC + b"\r\nPING\n" + CTRL_C,
                   b"x" * 10 + IAC + IAC + b"y" * 10 + b"\n" + IAC + SB + b"\n\n" + IAC + SE + b"\n"]
        streams += [telnet_stream(rng, 30) for _ in range(40)]
        for data in streams:
            for max_line in (4096, 8):
                whole, _ = feed_in_pieces(data, [], max_line)
                self.assertEqual(feed_in_pieces(data, range(1, len(data)), max_line)[0], whole,
                                 (data, max_line))
                for i in range(len(data) + 1):
                    self.assertEqual(feed_in_pieces(data, [i], max_line)[0], whole,
                                     (data, max_line, i))

    def test_a_literal_0xff_in_a_line_is_kept_across_reads(self):
        # IAC IAC, then IAC and a byte that is no command (both text), cut
        # after each IAC.
        items, reader = feed_in_pieces(b"MSG a" + IAC + IAC + b"b" + IAC + b"c\n", [6, 7, 9])
        self.assertEqual(items, [b"MSG a\xffb\xffc"])
        self.assertEqual(reader.buffered, 0)

    def test_too_long_counts_text_not_commands(self):
        reader = LineReader(8)                    # 7 bytes and the \n
        self.assertEqual(reader.feed(b"abc" + IAC + DO + ECHO + b"defg\n"),
                         [Answer(IAC + WONT + ECHO), b"abcdefg"])
        self.assertEqual(reader.feed(b"abc" + IAC + IAC + b"defg\n"), [TOO_LONG])
        # A 0xff of text is one byte kept, however it came; a command cut
        # short adds at most 4 bytes to what is kept.
        for _ in range(7):
            self.assertEqual(reader.feed(IAC), [])
            self.assertEqual(reader.feed(IAC), [])
        self.assertEqual(reader.buffered, 7)
        self.assertEqual(reader.feed(IAC + SB + IAC + DO), [])
        self.assertEqual(reader.buffered, 7 + 4)
        self.assertEqual(reader.feed(ECHO + IAC + SE + b"\n"), [Answer(IAC + WONT + ECHO), b"\xff" * 7])
        self.assertEqual(reader.feed(IAC * 16 + b"\n"), [TOO_LONG])
        self.assertEqual(reader.buffered, 0)

    def test_no_0xff_no_change(self):
        data = b"LOGIN a\r\nMSG hi\n" + b"z" * 5000 + b"\nPING"
        reader = LineReader(4096)
        self.assertEqual(reader.feed(data), [b"LOGIN a", b"MSG hi", TOO_LONG])
        self.assertEqual(reader.buffered, 4)


# -- the server, over real sockets ---------------------------------------------

def read_bytes(client, n, timeout=IO_TIMEOUT):
    """Exactly the next ``n`` bytes ``client`` gets."""
    deadline = time.monotonic() + timeout
    while len(client.buf) < n:
        data = receive(client.sock, deadline,
                       lambda: "%d bytes expected, have %r" % (n, client.buf))
        if not data:
            raise AssertionError("closed after %r" % client.buf)
        client.buf += data
    got, client.buf = client.buf[:n], client.buf[n:]
    return got


def bytes_until_eof(client, timeout=IO_TIMEOUT):
    deadline = time.monotonic() + timeout
    while True:
        data = receive(client.sock, deadline, lambda: "not closed (have %r)" % client.buf)
        if not data:
            got, client.buf = client.buf, b""
            return got
        client.buf += data


class TelnetBytes(TestCase):
    """What GNU telnet sends, byte for byte, to a real server."""

    def setUp(self):
        super().setUp()
        self.s = self.server(workers=2)

    def test_ctrl_c_ends_the_session_as_quit_does(self):
        ada, bob = self.client(self.s, "ada"), self.client(self.s, "bob")
        ada.sendraw(b"PING\r\n" + CTRL_C + b"MSG never\r\n")
        self.assertEqual(bytes_until_eof(ada), b"PONG\n" + WILL_TM)
        bob.expect("INFO ada disconnected")
        bob.send("WHO")
        bob.expect("USER bob")
        bob.expect_nothing_more()
        self.s.wait_log(r"ada disconnected \(interrupt \(telnet's Ctrl-C\)\)")

    def test_ctrl_c_before_login(self):
        c = self.client(self.s)
        c.sendraw(CTRL_C)
        self.assertEqual(bytes_until_eof(c), WILL_TM)

    def test_negotiation_before_login_is_answered_not_taken_for_a_line(self):
        ada, bob = self.client(self.s), self.client(self.s, "bob")
        ada.sendraw(IAC + WILL + NAWS + IAC + SB + NAWS + b"\x00\x50\x00\x18" + IAC + SE
                    + IAC + DO + ECHO + IAC + DO + SGA + IAC + WONT + LINEMODE
                    + IAC + DONT + ECHO + IAC + NOP + b"LOGIN ada\r\n")
        self.assertEqual(read_bytes(ada, 12), IAC + DONT + NAWS + IAC + WONT + ECHO
                         + IAC + WONT + SGA + b"OK\n")
        ada.send("WHO")
        ada.expect("USER bob", "USER ada")
        ada.sendraw(b"MSG caf" + IAC + IAC + b" " + IAC + AYT + b"ok\r\n")
        bob.expect("MSG ada caf%s ok" % FFFD)       # one 0xff: one U+FFFD
        ada.expect_nothing_more()

    def test_a_tls_client_hello_is_no_telnet(self):
        # Its random bytes may hold IAC IP: it still gets its answer.
        c = self.client(self.s)
        c.sendraw(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + CTRL_C + b"\n\x00\xff")
        self.assertEqual(bytes_until_eof(c), b"ERR not-a-chat-client\n")

    def test_commands_cut_between_reads(self):
        ada, bob = self.client(self.s, "ada"), self.client(self.s, "bob")
        # Each PONG shows that the server has read up to the cut.
        for first, second, answer in [(IAC, DO + TM, WILL_TM), (IAC + DO, ECHO, IAC + WONT + ECHO),
                                      (IAC + SB + NAWS + b"\x00", b"\x50" + IAC + SE, b""),
                                      (IAC + SB + b"\x00" + IAC, SE, b"")]:
            ada.sendraw(b"PING\r\n" + first)
            ada.expect("PONG")
            ada.sendraw(second + b"PING\r\n")
            self.assertEqual(read_bytes(ada, len(answer) + 5), answer + b"PONG\n", (first, second))
        ada.sendraw(b"MSG caf" + IAC)
        ada.sendraw(IAC + b"!\r\n")
        bob.expect("MSG ada caf%s!" % FFFD)
        ada.sendraw(b"PING\r\n" + IAC)
        ada.expect("PONG")
        ada.sendraw(IP + IAC + DO + TM)
        self.assertEqual(bytes_until_eof(ada), WILL_TM)
        bob.expect("INFO ada disconnected")


class TelnetOverTls(TestCase):
    """The same stripping for a TLS client: it happens where both go through."""

    def test_negotiation_and_ctrl_c_over_tls(self):
        directory = tempfile.mkdtemp(prefix="chat-telnet-test-")
        self.addCleanup(shutil.rmtree, directory, True)
        try:
            cert = self_signed(directory)
        except RuntimeError as exc:             # no openssl
            self.skipTest(str(exc))
        s = self.server(workers=1, tls=cert)
        ada = TlsClient(s.tls_port, any_certificate())
        self.addCleanup(ada.close)
        bob = self.client(s, "bob")
        ada.sendraw(IAC + DO + ECHO + b"LOG" + IAC + WILL + NAWS + b"IN ada\r\n")
        self.assertEqual(read_bytes(ada, 9), IAC + WONT + ECHO + IAC + DONT + NAWS + b"OK\n")
        ada.sendraw(CTRL_C)
        self.assertEqual(bytes_until_eof(ada), WILL_TM)
        bob.expect("INFO ada disconnected")


# -- the real telnet, in tmux -----------------------------------------------------

TELNET, TMUX = shutil.which("telnet"), shutil.which("tmux")


@unittest.skipUnless(TELNET and TMUX, "needs the telnet and tmux programs "
                     "(Debian/Ubuntu: apt-get install telnet tmux)")
class RealTelnet(TestCase):
    """GNU telnet in a tmux pane: what its user sees."""

    def tmux(self, *args):
        return subprocess.run([TMUX, "-L", self.tmux_socket, "-f", os.devnull] + list(args),
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=IO_TIMEOUT,
                              check=True).stdout.decode("utf-8", "replace")

    def screen_shows(self, pattern, count=1):
        """Wait until ``pattern`` is on the screen ``count`` times; the screen."""
        deadline = time.monotonic() + IO_TIMEOUT
        while True:
            screen = self.tmux("capture-pane", "-p", "-t", "telnet")
            if len(re.findall(pattern, screen, re.M)) >= count:
                return screen
            if time.monotonic() > deadline:
                raise AssertionError("%r not on the screen %d times:\n%s" % (pattern, count, screen))
            time.sleep(0.05)

    def type(self, *keys):
        self.tmux("send-keys", "-t", "telnet", *keys)

    def test_ctrl_c_leaves_and_output_comes_back_after_an_interrupt(self):
        s = self.server(workers=1)
        self.tmux_socket = "chat-test-%d" % os.getpid()
        self.tmux("new-session", "-d", "-s", "telnet", "-x", "100", "-y", "40",
                  "%s 127.0.0.1 %d" % (TELNET, s.port))
        self.addCleanup(subprocess.run, [TMUX, "-L", self.tmux_socket, "kill-server"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=IO_TIMEOUT)
        self.tmux("set-option", "-w", "-t", "telnet", "remain-on-exit", "on")   # its last words
        self.screen_shows(r"^Escape character is")
        self.type("LOGIN ada", "Enter")
        self.screen_shows(r"^OK$")
        bob = self.client(s, "bob")
        # Ctrl-\ sends IAC BRK IAC DO TIMING-MARK: telnet shows nothing more
        # until the timing mark is answered.
        self.type("C-\\")
        self.type("PING", "Enter")
        self.screen_shows(r"^PONG$")
        bob.send("DM ada hello")
        self.screen_shows(r"^DM bob hello$")
        self.type("C-c")
        screen = self.screen_shows(r"Connection closed by foreign host\.$")
        self.assertNotIn("ERR", screen)
        bob.expect("INFO ada disconnected")
        bob.send("WHO")
        bob.expect("USER bob")


if __name__ == "__main__":
    unittest.main()
