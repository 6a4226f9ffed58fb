"""Unit tests of the sans-IO RESP2 codec: plain function calls, no sockets.

The replies are fed cut at every byte, and at every pair of bytes, since a
socket may split them anywhere.
"""

import time
import unittest

from support import UnitTestCase

from chatlib.cluster.resp import Parser, ProtocolError, RedisError, encode

# One reply of every kind, and nested arrays with nulls inside.
MIXED = (b"+OK\r\n"
         b"-NOSCRIPT No matching script. Please use EVAL.\r\n"
         b":42\r\n"
         b":-7\r\n"
         b"$5\r\nhello\r\n"
         b"$0\r\n\r\n"
         b"$4\r\n\r\n\r\n\r\n"                  # a bulk string of CR LF CR LF
         b"$-1\r\n"
         b"*-1\r\n"
         b"*0\r\n"
         b"*3\r\n:1\r\n*2\r\n$1\r\na\r\n$-1\r\n*1\r\n*0\r\n"
         b"+\r\n")
MIXED_REPLIES = ["OK", ("error", "NOSCRIPT No matching script. Please use EVAL."), 42, -7,
                 b"hello", b"", b"\r\n\r\n", None, None, [], [1, [b"a", None], [[]]], ""]


def plain(reply):
    """A reply with each RedisError as a tuple, so that replies compare with ``==``."""
    if isinstance(reply, RedisError):
        return ("error", reply.message)
    if isinstance(reply, list):
        return [plain(item) for item in reply]
    return reply


def parse(*pieces):
    parser = Parser()
    replies = []
    for piece in pieces:
        replies += parser.feed(piece)
    return [plain(reply) for reply in replies]


class Encode(UnitTestCase):

    def test_arguments_of_every_type(self):
        self.assertEqual(encode("SET", b"k\r\n", 5, 1.5, bytearray(b"x"), "é", b""),
                         b"*7\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$1\r\n5\r\n$3\r\n1.5\r\n"
                         b"$1\r\nx\r\n$2\r\n\xc3\xa9\r\n$0\r\n\r\n")

    def test_a_command_parses_as_an_array_of_bulk_strings(self):
        self.assertEqual(parse(encode("XADD", "s", "*", "n", -12, 0.25)),
                         [[b"XADD", b"s", b"*", b"n", b"-12", b"0.25"]])

    def test_other_types_are_refused(self):
        with self.assertRaisesRegex(TypeError, "not NoneType"):
            encode("GET", None)


class Parse(UnitTestCase):

    def test_every_kind_of_reply_in_one_piece(self):
        self.assertEqual(parse(MIXED), MIXED_REPLIES)

    def test_cut_at_every_byte(self):
        for i in range(len(MIXED) + 1):
            with self.subTest(cut=i):
                self.assertEqual(parse(MIXED[:i], MIXED[i:]), MIXED_REPLIES)

    def test_cut_at_every_pair_of_bytes(self):
        for i in range(len(MIXED) + 1):
            for j in range(i, len(MIXED) + 1):
                if parse(MIXED[:i], MIXED[i:j], MIXED[j:]) != MIXED_REPLIES:
                    self.fail("wrong replies when cut at %d and %d" % (i, j))

    def test_one_byte_at_a_time(self):
        self.assertEqual(parse(*(MIXED[i:i + 1] for i in range(len(MIXED)))), MIXED_REPLIES)

    def test_a_reply_is_returned_by_the_feed_that_completes_it(self):
        parser = Parser()
        self.assertEqual(parser.feed(b"*2\r\n:1\r\n$3\r\nab"), [])
        self.assertEqual(parser.feed(b"c\r\n+OK"), [[1, b"abc"]])
        self.assertEqual(parser.feed(b"\r\n"), ["OK"])

    def test_an_error_is_a_value_with_its_code(self):
        error, = Parser().feed(b"-WRONGPASS invalid username-password pair\r\n")
        self.assertIsInstance(error, RedisError)
        self.assertEqual(error.code, "WRONGPASS")
        self.assertEqual(error.message, "WRONGPASS invalid username-password pair")
        self.assertEqual(str(error), error.message)

    def test_deeply_nested_arrays(self):
        depth = 50
        self.assertEqual(parse(b"*1\r\n" * depth + b":5\r\n", b"+next\r\n"),
                         [eval("[" * depth + "5" + "]" * depth), "next"])

    def test_nonsense_is_a_protocol_error(self):
        for data in (b"$-2\r\n", b"*-5\r\n", b"?x\r\n", b"%1\r\n", b"\r\n", b":4x\r\n",
                     b"$\r\n", b"$3\r\nabcd\r\n", b"$%d\r\n" % (1 << 30)):
            with self.subTest(data=data):
                with self.assertRaises(ProtocolError):
                    Parser().feed(data)

    def test_nonsense_is_seen_when_its_line_ends(self):
        parser = Parser()
        self.assertEqual(parser.feed(b"+OK\r\n$-2"), ["OK"])
        with self.assertRaises(ProtocolError):
            parser.feed(b"\r\n")

    def test_big_replies_in_small_pieces_take_linear_time(self):
        """Each case takes seconds for a parser that works again through what
        it has seen at every piece: about 16 GB copied for a buffer joined
        anew (the bulk string), 8 GB scanned for a line's end looked for from
        its start (the simple string), 50 million items parsed for an array
        parsed from its first item."""
        bulk = b"x" * (32 << 20)
        line = "y" * (16 << 20)
        items = 100000
        for data, size, want in (
                (b"$%d\r\n%b\r\n" % (len(bulk), bulk), 32 << 10, bulk),
                (b"+%s\r\n" % line.encode(), 16 << 10, line),
                (b"*%d\r\n" % items + b"$5\r\nitem!\r\n" * items, 1 << 10, [b"item!"] * items)):
            parser = Parser()
            replies = []
            started = time.process_time()
            for i in range(0, len(data), size):
                replies += parser.feed(data[i:i + size])
            self.assertLess(time.process_time() - started, 1.5)
            self.assertEqual(replies, [want])


if __name__ == "__main__":
    unittest.main()
