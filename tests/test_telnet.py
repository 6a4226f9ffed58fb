"""Telnet clients: the sans-IO scanner of telnet's commands
(``chatlib.telnet.scan``), rule by rule and cut at every byte."""

import os
import random
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from chatlib import telnet                                      # noqa: E402
from chatlib.telnet import INTERRUPT, Answer                    # noqa: E402

IAC, DONT, DO, WONT, WILL, SB, SE = b"\xff", b"\xfe", b"\xfd", b"\xfc", b"\xfb", b"\xfa", b"\xf0"
IP, BRK, NOP, AYT = b"\xf4", b"\xf3", b"\xf1", b"\xf6"
ECHO, SGA, TM, NAWS, LINEMODE = b"\x01", b"\x03", b"\x06", b"\x1f", b"\x22"
CTRL_C = IAC + IP + IAC + DO + TM               # what telnet sends for Ctrl-C
WILL_TM = IAC + WILL + TM


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


if __name__ == "__main__":
    unittest.main()
