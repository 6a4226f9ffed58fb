"""Unit tests of the sans-IO protocol module, rule by rule from PROTOCOL.md.

Everything here is a plain function call: no sockets, no processes, no
clock. The black-box counterparts over TCP are in ``test_contract.py``.
"""

import random
import unittest

from support import UnitTestCase

from chatlib import protocol
from chatlib.protocol import (PING, QUIT, TOO_LONG, WHO, Dm, LineReader,
                              Login, Msg, Password, Register, Reply, clean_text, parse_line,
                              valid_name)

FFFD = "\ufffd".encode()

ERR = {
    "username-taken": b"ERR username-taken\n",
    "invalid-username": b"ERR invalid-username\n",
    "already-logged-in": b"ERR already-logged-in\n",
    "not-logged-in": b"ERR not-logged-in\n",
    "empty-message": b"ERR empty-message\n",
    "user-not-found": b"ERR user-not-found\n",
    "unknown-command": b"ERR unknown-command\n",
}


def err(token):
    return Reply(ERR[token])


# Every code point the contract says must become U+FFFD in a text.
UNSAFE = ([c for c in range(0x20) if c != 0x09] + [0x7F] + list(range(0x80, 0xA0))
          + list(range(0x202A, 0x202F)) + list(range(0x2066, 0x206A)))
# Their neighbours, and other characters that must pass untouched.
SAFE = [0x09, 0x20, 0x21, 0x7E, 0xA0, 0xA1, 0xE9, 0x2029, 0x202F, 0x2065, 0x206A,
        0x200E, 0x200F, 0xFEFF, 0x4E2D, 0x1F600, 0xFFFD]


class ParseCommands(UnitTestCase):
    """What each command line turns into, logged in and not."""

    def test_commands_are_case_insensitive(self):
        for word in (b"login", b"Login", b"LOGIN", b"lOgIn"):
            self.assertEqual(parse_line(word + b" bob", False), Login("bob"))
        for word in (b"msg", b"Msg", b"MSG", b"mSg"):
            self.assertEqual(parse_line(word + b" hi", True), Msg(b"hi"))
        for word in (b"dm", b"Dm", b"DM", b"dM"):
            self.assertEqual(parse_line(word + b" bob hi", True), Dm("bob", b"hi"))
        for word in (b"who", b"Who", b"WHO", b"wHo"):
            self.assertEqual(parse_line(word, True), WHO)
        for word in (b"ping", b"Ping", b"PING", b"pInG"):
            self.assertEqual(parse_line(word, True), PING)
            self.assertEqual(parse_line(word, False), PING)
        for word in (b"quit", b"Quit", b"QUIT", b"qUiT"):
            self.assertEqual(parse_line(word, True), QUIT)
            self.assertEqual(parse_line(word, False), QUIT)

    def test_login(self):
        self.assertEqual(parse_line(b"LOGIN Naman", False), Login("Naman"))
        # the name is kept as typed: case is the server's business
        self.assertEqual(parse_line(b"LOGIN nAmAn", False), Login("nAmAn"))
        self.assertEqual(parse_line(b"LOGIN a", False), Login("a"))
        self.assertEqual(parse_line(b"LOGIN " + b"x" * 32, False), Login("x" * 32))
        self.assertEqual(parse_line(b"LOGIN A-z_0.9", False), Login("A-z_0.9"))

    def test_login_invalid_names(self):
        for line in (b"LOGIN", b"LOGIN ", b"LOGIN  \t ", b"LOGIN " + b"x" * 33,
                     b"LOGIN a!",
                     b"LOGIN a/b", b"LOGIN a:b", b"LOGIN a,b", b"LOGIN @a", b"LOGIN a+b",
                     b"LOGIN \xc3\xa9", b"LOGIN caf\xc3\xa9", b"LOGIN a\xff",
                     b"LOGIN a\x00", b"LOGIN a\x0bb", b"LOGIN a\x1b", b"LOGIN a\r"):
            with self.subTest(line=line):
                self.assertEqual(parse_line(line, False), err("invalid-username"))

    def test_login_with_a_password(self):
        # The rest of the line, trimmed; the broker decides what it means
        # (without accounts, LOGIN a b is ERR invalid-username: test_accounts_live).
        self.assertEqual(parse_line(b"LOGIN a b", False), Login("a", "b"))
        self.assertEqual(parse_line(b"LOGIN a\tb", False), Login("a", "b"))
        self.assertEqual(parse_line(b"LOGIN a  b  c \t", False), Login("a", "b  c"))
        self.assertEqual(parse_line(b"LOGIN bob   ", False), Login("bob"))
        self.assertEqual(parse_line(b"LOGIN bob! pw", False), err("invalid-username"))

    def test_register_and_password(self):
        self.assertEqual(parse_line(b"REGISTER  s3cret pass ", True), Register("s3cret pass"))
        self.assertEqual(parse_line(b"password new one", True), Password("new one"))
        self.assertEqual(parse_line(b"REGISTER x", False), err("not-logged-in"))
        self.assertEqual(parse_line(b"PASSWORD x", False), err("not-logged-in"))
        self.assertEqual(parse_line(b"LOGIN bob \t", False), Login("bob"))

    def test_msg(self):
        self.assertEqual(parse_line(b"MSG hi everyone!", True), Msg(b"hi everyone!"))
        self.assertEqual(parse_line(b"MSG x", True), Msg(b"x"))

    def test_msg_text_trimmed_inner_spacing_kept(self):
        self.assertEqual(parse_line(b"MSG   hi   there  ", True), Msg(b"hi   there"))
        self.assertEqual(parse_line(b"MSG\t\thi \t there\t \t", True), Msg(b"hi \t there"))
        self.assertEqual(parse_line(b"MSG a  b\t\tc", True), Msg(b"a  b\t\tc"))

    def test_msg_fast_path_agrees_with_the_general_one(self):
        # "MSG " takes a shortcut; "msg " the general path. Same answers.
        rng = random.Random(7)
        pieces = [b" ", b"\t", b"a", b"Z", b"\x0b", b"\x1b", b"\xc3\xa9", b"\xff", b"\x00"]
        for _ in range(2000):
            text = b"".join(rng.choice(pieces) for _ in range(rng.randrange(8)))
            for logged_in in (True, False):
                with self.subTest(text=text, logged_in=logged_in):
                    self.assertEqual(parse_line(b"MSG " + text, logged_in),
                                     parse_line(b"msg " + text, logged_in))

    def test_msg_empty(self):
        for line in (b"MSG", b"MSG ", b"MSG     ", b"MSG\t", b"MSG \t \t ", b"msg"):
            with self.subTest(line=line):
                self.assertEqual(parse_line(line, True), err("empty-message"))

    def test_dm(self):
        self.assertEqual(parse_line(b"DM Naman secret message", True),
                         Dm("Naman", b"secret message"))
        self.assertEqual(parse_line(b"DM x y", True), Dm("x", b"y"))

    def test_dm_spacing(self):
        self.assertEqual(parse_line(b"DM   bob   hello   world  ", True),
                         Dm("bob", b"hello   world"))
        self.assertEqual(parse_line(b"DM\tbob\t\thello \t world\t", True),
                         Dm("bob", b"hello \t world"))

    def test_dm_target_kept_as_typed(self):
        self.assertEqual(parse_line(b"DM BoB hi", True), Dm("BoB", b"hi"))

    def test_dm_empty(self):
        for line in (b"DM", b"DM ", b"DM bob", b"DM bob ", b"DM bob \t  ", b"DM\tbob\t",
                     b"dm   bob"):
            with self.subTest(line=line):
                self.assertEqual(parse_line(line, True), err("empty-message"))

    def test_dm_to_impossible_name_is_user_not_found(self):
        # A name that breaks the rule cannot be logged in: nobody has it.
        for line in (b"DM " + b"x" * 33 + b" hi", b"DM a!b hi", b"DM caf\xc3\xa9 hi",
                     b"DM \xff hi"):
            with self.subTest(line=line):
                self.assertEqual(parse_line(line, True), err("user-not-found"))

    def test_who_ping_quit_ignore_extra_words(self):
        self.assertEqual(parse_line(b"WHO is there", True), WHO)
        self.assertEqual(parse_line(b"WHO\tx", True), WHO)
        self.assertEqual(parse_line(b"PING 12345", True), PING)
        self.assertEqual(parse_line(b"PING a b c", False), PING)
        self.assertEqual(parse_line(b"QUIT bye now", True), QUIT)
        self.assertEqual(parse_line(b"QUIT bye", False), QUIT)

    def test_unknown_command(self):
        for line in (b"HELLO", b"hello world", b"MSGX hi", b"LOGINbob", b"PINGPONG",
                     b"WHOM", b"DMbob hi", b"QUITS", b"USER bob", b"OK", b"PONG",
                     b"\xff\xfe", b"M\xc3\xa9G hi", b"-", b"MSG\x0bhi", b"PING\x0c",
                     b"LOGIN\xc2\xa0bob"):
            for logged_in in (False, True):
                with self.subTest(line=line, logged_in=logged_in):
                    self.assertEqual(parse_line(line, logged_in), err("unknown-command"))

    def test_blank_lines_get_no_answer(self):
        for line in (b"", b" ", b"     ", b"\t", b" \t \t"):
            for logged_in in (False, True):
                with self.subTest(line=line, logged_in=logged_in):
                    self.assertIsNone(parse_line(line, logged_in))

    def test_leading_whitespace_before_the_command(self):
        self.assertEqual(parse_line(b"   PING", False), PING)
        self.assertEqual(parse_line(b"\t \tLOGIN\t bob", False), Login("bob"))
        self.assertEqual(parse_line(b"  \tMSG  hi", True), Msg(b"hi"))
        self.assertEqual(parse_line(b" DM bob  yo ", True), Dm("bob", b"yo"))
        self.assertEqual(parse_line(b"\tWHO", True), WHO)
        self.assertEqual(parse_line(b" QUIT", True), QUIT)

    def test_whitespace_is_space_and_tab_only(self):
        # Other blanks are neither separators nor trimmed.
        self.assertEqual(parse_line(b"MSG\x0bhi", True), err("unknown-command"))
        self.assertEqual(parse_line(b"\x0cPING", True), err("unknown-command"))
        self.assertEqual(parse_line(b"\xc2\xa0PING", True), err("unknown-command"))
        self.assertEqual(parse_line(b"MSG \x0bhi\x0c", True), Msg(FFFD + b"hi" + FFFD))
        self.assertEqual(parse_line(b"MSG \xc2\xa0hi\xc2\xa0", True),
                         Msg(b"\xc2\xa0hi\xc2\xa0"))
        self.assertEqual(parse_line(b"LOGIN bob\x0b", False), err("invalid-username"))
        self.assertEqual(parse_line(b"MSG hi\x1f", True), Msg(b"hi" + FFFD))

    def test_text_trimmed_before_sanitising(self):
        # Trimming sees the raw line: a control character at the edge stays
        # (as U+FFFD), whitespace around it goes.
        self.assertEqual(parse_line(b"MSG  \x1b[1m  hi \x07 ", True),
                         Msg(FFFD + b"[1m  hi " + FFFD))
        self.assertEqual(parse_line(b"MSG \x00", True), Msg(FFFD))
        self.assertEqual(parse_line(b"DM bob \x7f ", True), Dm("bob", FFFD))

    def test_msg_and_dm_text_are_sanitised(self):
        self.assertEqual(parse_line(b"MSG \x1b[31mred\x1b[0m", True),
                         Msg(FFFD + b"[31mred" + FFFD + b"[0m"))
        self.assertEqual(parse_line("DM bob a\u202eb".encode(), True),
                         Dm("bob", b"a" + FFFD + b"b"))
        self.assertEqual(parse_line(b"MSG a\xffb", True), Msg(b"a" + FFFD + b"b"))
        self.assertEqual(parse_line(b"DM bob a\xc3(", True), Dm("bob", b"a" + FFFD + b"("))


class CheckOrder(UnitTestCase):
    """already-logged-in and not-logged-in win over any argument problem."""

    def test_login_when_logged_in(self):
        for line in (b"LOGIN bob", b"LOGIN", b"LOGIN a b", b"LOGIN " + b"x" * 40,
                     b"LOGIN !!", b"login \xff", b"LoGiN   bob  "):
            with self.subTest(line=line):
                self.assertEqual(parse_line(line, True), err("already-logged-in"))

    def test_before_login(self):
        for line in (b"MSG", b"MSG hi", b"MSG   ", b"msg \x1b", b"WHO", b"who x y",
                     b"DM", b"DM bob", b"DM bob hi", b"DM !! hi", b"dm " + b"x" * 40 + b" hi"):
            with self.subTest(line=line):
                self.assertEqual(parse_line(line, False), err("not-logged-in"))

    def test_ping_and_quit_work_in_both_states(self):
        for logged_in in (False, True):
            self.assertEqual(parse_line(b"PING", logged_in), PING)
            self.assertEqual(parse_line(b"QUIT", logged_in), QUIT)


class Names(UnitTestCase):

    def test_valid(self):
        for name in (b"a", b"Z", b"0", b"_", b"-", b".", b"Naman", b"a.b-c_d",
                     b"x" * 32, b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"abcdefghijklmnopqrstuvwxyz",
                     b"0123456789", b"..", b"-.-"):
            with self.subTest(name=name):
                self.assertTrue(valid_name(name))

    def test_invalid(self):
        for name in (b"", b"x" * 33, b"x" * 100, b"a b", b"a\tb", b" a", b"a ", b"a!",
                     b"a@b", b"a#", b"a$", b"a%", b"a*", b"a/b", b"a\\b", b"a:b",
                     b"a;b", b"a,b", b"a'b", b'a"b', b"a+b", b"a=b", b"a~", b"(a)",
                     b"\xc3\xa9", b"na\xc3\xafve", b"\xff", b"a\x00", b"a\n", b"a\r",
                     b"a\x7f", "\u0430".encode()):
            with self.subTest(name=name):
                self.assertFalse(valid_name(name))

    def test_every_allowed_character_and_no_other_ascii(self):
        allowed = set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-.")
        for byte in range(256):
            with self.subTest(byte=byte):
                self.assertEqual(valid_name(bytes([byte])), byte in allowed)


class CleanText(UnitTestCase):

    def test_plain_text_unchanged(self):
        for text in ("hi everyone!", "a\tb", "  spaced  ", "caf\u00e9", "\u4e2d\u6587",
                     "emoji \U0001F600", "~!@#$%^&*()_+{}|:\"<>?`-=[]\\;',./", "\ufffd"):
            with self.subTest(text=text):
                self.assertEqual(clean_text(text.encode()), text.encode())

    def test_every_unsafe_code_point_becomes_fffd(self):
        for code in UNSAFE:
            with self.subTest(code=hex(code)):
                text = "a" + chr(code) + "b"
                self.assertEqual(clean_text(text.encode()), b"a" + FFFD + b"b")

    def test_safe_neighbours_kept(self):
        for code in SAFE:
            with self.subTest(code=hex(code)):
                text = ("a" + chr(code) + "b").encode()
                self.assertEqual(clean_text(text), text)

    def test_terminal_escape(self):
        self.assertEqual(clean_text(b"\x1b[2J\x1b]0;pwned\x07"),
                         FFFD + b"[2J" + FFFD + b"]0;pwned" + FFFD)

    def test_bidi_override(self):
        text = "safe \u202euoy.exe \u2066x\u2069".encode()
        self.assertEqual(clean_text(text),
                         b"safe " + FFFD + b"uoy.exe " + FFFD + b"x" + FFFD)

    def test_c1_controls_as_utf8(self):
        self.assertEqual(clean_text(b"a\xc2\x85b\xc2\x9bc"), b"a" + FFFD + b"b" + FFFD + b"c")

    def test_invalid_utf8_becomes_fffd(self):
        self.assertEqual(clean_text(b"a\xffb"), b"a" + FFFD + b"b")
        self.assertEqual(clean_text(b"\x80"), FFFD)
        self.assertEqual(clean_text(b"a\xc3"), b"a" + FFFD)             # truncated
        self.assertEqual(clean_text(b"\xc3(x"), FFFD + b"(x")
        self.assertEqual(clean_text(b"x\xe2\x82"), b"x" + FFFD)         # truncated 3-byte
        for raw in (b"\xc0\xaf", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xfe\xff",
                    b"\xf4\x90\x80\x80", b"ok\xe2\x28\xa1ok"):
            with self.subTest(raw=raw):
                out = clean_text(raw)
                decoded = out.decode("utf-8")          # always valid UTF-8
                self.assertIn("\ufffd", decoded)
                self.assertNotIn(b"\xed\xa0", out)

    def test_result_is_always_valid_utf8(self):
        rng = random.Random(2)
        for _ in range(500):
            raw = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 20)))
            out = clean_text(raw)
            text = out.decode("utf-8")
            for ch in text:
                self.assertNotIn(ord(ch), UNSAFE, (raw, out))

    def test_tab_kept(self):
        self.assertEqual(clean_text(b"a\t\tb"), b"a\t\tb")


class Lines(UnitTestCase):
    """The *_line helpers build exact wire lines ending in \\n."""

    def test_msg_line(self):
        self.assertEqual(protocol.msg_line(b"Naman", b"hi everyone!"),
                         b"MSG Naman hi everyone!\n")
        self.assertEqual(protocol.msg_line(b"a", b"hi   there"), b"MSG a hi   there\n")

    def test_dm_line(self):
        self.assertEqual(protocol.dm_line(b"Yudi", b"secret message"),
                         b"DM Yudi secret message\n")

    def test_user_lines(self):
        self.assertEqual(protocol.user_lines(["Naman", "Yudi"]), b"USER Naman\nUSER Yudi\n")
        self.assertEqual(protocol.user_lines(["b", "A", "c"]), b"USER b\nUSER A\nUSER c\n")
        self.assertEqual(protocol.user_lines([]), b"")

    def test_info_disconnected(self):
        self.assertEqual(protocol.info_disconnected("Yudi"), b"INFO Yudi disconnected\n")

    def test_fixed_lines(self):
        self.assertEqual(protocol.OK, b"OK\n")
        self.assertEqual(protocol.PONG, b"PONG\n")
        for token, line in ERR.items():
            self.assertEqual(getattr(protocol, "ERR_" + token.upper().replace("-", "_")), line)
        self.assertEqual(protocol.ERR_LINE_TOO_LONG, b"ERR line-too-long\n")
        self.assertEqual(protocol.ERR_IDLE_TIMEOUT, b"ERR idle-timeout\n")
        self.assertEqual(protocol.ERR_SERVER_FULL, b"ERR server-full\n")
        self.assertEqual(protocol.ERR_SLOW_CONSUMER, b"ERR slow-consumer\n")
        self.assertEqual(protocol.ERR_SERVER_SHUTDOWN, b"ERR server-shutdown\n")


class MsgBlock(UnitTestCase):
    """msg_block, the flood's fast path, against parse_line and msg_line."""

    @staticmethod
    def line_by_line(lines, sender):
        """What the worker makes of ``lines`` one at a time (None: not all MSGs)."""
        out = []
        for line in lines:
            cmd = parse_line(line, True) if line is not TOO_LONG else None
            if type(cmd) is not Msg:
                return None
            out.append(protocol.msg_line(sender, cmd.text))
        return b"".join(out)

    def test_plain_msgs(self):
        lines = [b"MSG hi everyone!", b"MSG a  b\tc", b"MSG x"]
        self.assertEqual(protocol.msg_block(lines, b"Naman"),
                         b"MSG Naman hi everyone!\nMSG Naman a  b\tc\nMSG Naman x\n")
        self.assertEqual(protocol.msg_block(lines, b"Naman"), self.line_by_line(lines, b"Naman"))

    def test_refuses_what_needs_a_closer_look(self):
        for odd in (b"msg lower case", b"MSG  leading", b"MSG \tleading", b"MSG trailing ",
                    b"MSG trailing\t", b"MSG ", b"MSG", b"MSG esc\x1b[2J", b"MSG caf\xc3\xa9",
                    b"PING", b"DM bob hi", b"", TOO_LONG):
            for lines in ([odd], [b"MSG fine", odd], [odd, b"MSG fine"]):
                with self.subTest(lines=lines):
                    self.assertIsNone(protocol.msg_block(lines, b"ann"))

    def test_agrees_with_the_line_by_line_path(self):
        rng = random.Random(11)
        heads = [b"MSG "] * 12 + [b"msg ", b"MSG", b"DM ", b""]
        pieces = [b"a", b"a", b"~", b" ", b"\t", b"MSG ", b"\x1b", b"\xc3\xa9", b"\x7f"]
        fast = 0
        for _ in range(3000):
            lines = [rng.choice(heads)
                     + b"".join(rng.choice(pieces) for _ in range(rng.randrange(4)))
                     for _ in range(rng.randrange(1, 4))]
            block = protocol.msg_block(lines, b"ann")
            with self.subTest(lines=lines):
                if block is not None:
                    fast += 1
                    self.assertEqual(block, self.line_by_line(lines, b"ann"))
        self.assertGreater(fast, 100)       # the comparison really ran


def reference_lines(stream, max_line):
    """What a LineReader must produce for ``stream`` fed at once (spec model)."""
    out = []
    parts = stream.split(b"\n")
    for line in parts[:-1]:
        if len(line) + 1 > max_line:
            out.append(TOO_LONG)
        elif line.endswith(b"\r"):
            out.append(line[:-1])
        else:
            out.append(line)
    return out


def feed_all(reader, chunks):
    out = []
    for chunk in chunks:
        out.extend(reader.feed(chunk))
    return out


class LineReaderTests(UnitTestCase):

    def test_splits_lines(self):
        r = LineReader(4096)
        self.assertEqual(r.feed(b"LOGIN a\nWHO\nPING\n"), [b"LOGIN a", b"WHO", b"PING"])
        self.assertEqual(r.buffered, 0)

    def test_crlf_and_lf(self):
        r = LineReader(4096)
        self.assertEqual(r.feed(b"a\r\nb\nc\r\n"), [b"a", b"b", b"c"])

    def test_only_one_cr_removed_inner_cr_kept(self):
        r = LineReader(4096)
        self.assertEqual(r.feed(b"a\r\r\n"), [b"a\r"])
        self.assertEqual(r.feed(b"a\rb\n"), [b"a\rb"])
        self.assertEqual(r.feed(b"\r\n"), [b""])

    def test_empty_lines_are_lines(self):
        # They count for the idle timer; parse_line ignores them.
        r = LineReader(4096)
        self.assertEqual(r.feed(b"\n\n  \n"), [b"", b"", b"  "])

    def test_partial_line_waits_for_its_newline(self):
        r = LineReader(4096)
        self.assertEqual(r.feed(b"PI"), [])
        self.assertEqual(r.buffered, 2)
        self.assertEqual(r.feed(b"N"), [])
        self.assertEqual(r.feed(b"G\nMS"), [b"PING"])
        self.assertEqual(r.feed(b"G hi\r"), [])
        self.assertEqual(r.feed(b"\n"), [b"MSG hi"])
        self.assertEqual(r.buffered, 0)

    def test_max_line_counts_the_newline(self):
        r = LineReader(16)
        self.assertEqual(r.feed(b"x" * 15 + b"\n"), [b"x" * 15])       # 16 bytes: fits
        self.assertEqual(r.feed(b"x" * 16 + b"\n"), [TOO_LONG])        # 17 bytes
        self.assertEqual(r.feed(b"ok\n"), [b"ok"])                     # still usable

    def test_max_line_counts_the_cr(self):
        r = LineReader(16)
        self.assertEqual(r.feed(b"x" * 14 + b"\r\n"), [b"x" * 14])     # 16 bytes
        self.assertEqual(r.feed(b"x" * 15 + b"\r\n"), [TOO_LONG])      # 17 bytes
        self.assertEqual(r.feed(b"x" * 14 + b"\r"), [])
        self.assertEqual(r.feed(b"\n"), [b"x" * 14])
        self.assertEqual(r.feed(b"x" * 15 + b"\r"), [])
        self.assertEqual(r.feed(b"\n"), [TOO_LONG])

    def test_default_limit_4096(self):
        r = LineReader(4096)
        self.assertEqual(r.feed(b"x" * 4095 + b"\n"), [b"x" * 4095])
        self.assertEqual(r.feed(b"x" * 4096 + b"\n"), [TOO_LONG])
        self.assertEqual(r.feed(b"x" * 4094 + b"\r\n"), [b"x" * 4094])
        self.assertEqual(r.feed(b"x" * 4095 + b"\r\n"), [TOO_LONG])

    def test_over_long_line_reported_when_its_newline_arrives(self):
        r = LineReader(16)
        self.assertEqual(r.feed(b"x" * 10), [])
        self.assertEqual(r.feed(b"x" * 10), [])                       # over the limit now
        self.assertEqual(r.feed(b"y" * 1000), [])                     # still not reported
        self.assertLessEqual(r.buffered, 16)                          # nothing hoarded
        self.assertEqual(r.feed(b"zz\nPING\n"), [TOO_LONG, b"PING"])
        self.assertEqual(r.feed(b"x" * 100), [])
        self.assertEqual(r.feed(b"\n"), [TOO_LONG])
        self.assertEqual(r.feed(b"WHO\n"), [b"WHO"])

    def test_over_long_line_in_one_feed_between_good_ones(self):
        r = LineReader(16)
        self.assertEqual(r.feed(b"a\n" + b"x" * 50 + b"\nb\n"), [b"a", TOO_LONG, b"b"])

    def test_buffer_is_bounded(self):
        r = LineReader(64)
        for _ in range(100):
            r.feed(b"x" * 1000)
            self.assertLessEqual(r.buffered, 64)
        self.assertEqual(r.feed(b"\n"), [TOO_LONG])

    def test_split_at_every_byte_boundary(self):
        stream = (b"LOGIN a\r\nMSG caf\xc3\xa9 \xe2\x80\xae\n\n" + b"x" * 20 + b"\n"
                  + b"y" * 15 + b"\r\n" + b"y" * 14 + b"\r\nPING\n" + b"z" * 16 + b"\n"
                  + b"\r\n" + b"tail")
        expected = reference_lines(stream, 16)
        self.assertIn(TOO_LONG, expected)
        self.assertEqual(feed_all(LineReader(16), [stream]), expected)
        for i in range(len(stream) + 1):
            with self.subTest(split=i):
                self.assertEqual(feed_all(LineReader(16), [stream[:i], stream[i:]]), expected)
        for i in range(len(stream) + 1):
            for j in range(i, len(stream) + 1, 3):
                self.assertEqual(
                    feed_all(LineReader(16), [stream[:i], stream[i:j], stream[j:]]),
                    expected, (i, j))
        one_by_one = [stream[i:i + 1] for i in range(len(stream))]
        self.assertEqual(feed_all(LineReader(16), one_by_one), expected)

    def test_random_streams_and_chunkings(self):
        rng = random.Random(1)
        alphabet = b"ab \t\r\n\n\xc3\xfe"     # no 0xff: telnet's (test_telnet.py)
        for _ in range(300):
            max_line = rng.choice([16, 17, 20, 32])
            stream = bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 120)))
            if rng.random() < 0.3:
                stream += b"x" * rng.randrange(10, 60) + b"\n"
            expected = reference_lines(stream, max_line)
            chunks, i = [], 0
            while i < len(stream):
                n = rng.randrange(1, 25)
                chunks.append(stream[i:i + n])
                i += n
            reader = LineReader(max_line)
            self.assertEqual(feed_all(reader, chunks), expected, (stream, max_line, chunks))
            self.assertLessEqual(reader.buffered, max_line)


if __name__ == "__main__":
    unittest.main()
