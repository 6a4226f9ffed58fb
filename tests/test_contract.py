"""Black-box tests of PROTOCOL.md over real TCP, row by row.

Every test starts its own ``broker.py`` (about 0.1 s with ``fork``), so no
test sees another's users. Absence is proved with barriers (a WHO answered by
the broker, then a PING), never by sleeping; timing is used only where the
contract is about time (the idle timeout), with small timeouts.
"""

import os
import select
import signal
import socket
import sys
import time
import unittest

from support import (BROKER, Server, TestCase, chat_among, free_port, per_start_method,
                     process_role, read_until_eof, run_to_exit, served_once_free,
                     socket_inodes, tcp_sockets)

FFFD = "\ufffd"
OPTIONS = ["--port", "-p", "--host", "--workers", "-w", "--idle-timeout", "-t",
           "--max-clients", "--max-line", "--max-pending", "--start-method", "--log-level"]


def worker_of(server, client):
    """The title of the server process holding ``client``'s connection."""
    cport = client.sock.getsockname()[1]
    inodes = {inode for lport, rport, _, inode in tcp_sockets()
              if lport == server.port and rport == cport and inode != "0"}
    for pid in server.pids():
        if inodes & socket_inodes(pid):
            return process_role(pid)
    return None


def run_broker(*args, env=None):
    """``python broker.py ARGS``, expected to exit by itself."""
    return run_to_exit(sys.executable, BROKER, *args, env=env, timeout=10)


class ContractCase(TestCase):
    """A fresh two-worker server for every test."""

    workers = 2
    server_args = ()
    idle_timeout = None
    start_method = None

    def setUp(self):
        super().setUp()
        self.s = self.server(*self.server_args, workers=self.workers,
                             start_method=self.start_method, idle_timeout=self.idle_timeout)

    def user(self, name):
        return self.client(self.s, name)

    def anon(self):
        """A connection that has not logged in (and is surely in a worker)."""
        c = self.client(self.s)
        c.send("PING")
        c.expect("PONG")
        return c


class Login(ContractCase):

    def test_ok_with_any_case_of_the_command(self):
        for i, word in enumerate(["LOGIN", "login", "Login", "lOgIn"]):
            c = self.client(self.s)
            c.send("%s user%d" % (word, i))
            c.expect("OK")
        c.send("WHO")
        c.expect("USER user0", "USER user1", "USER user2", "USER user3")

    def test_invalid_username(self):
        c = self.client(self.s)
        for line in ["LOGIN", "LOGIN   ", "LOGIN \t", "LOGIN a b", "LOGIN a\tb",
                     "LOGIN " + "x" * 33, "LOGIN a!b", "LOGIN caf\u00e9", "LOGIN a/b",
                     "LOGIN a:b", "LOGIN @a", "LOGIN a,b"]:
            c.send(line)
            c.expect("ERR invalid-username")
        c.send("LOGIN " + "Ab0_.-" * 5 + "zz")            # 32 characters: fine
        c.expect("OK")
        c.send("WHO")
        c.expect("USER " + "Ab0_.-" * 5 + "zz")

    def test_invalid_utf8_name(self):
        c = self.client(self.s)
        c.sendraw(b"LOGIN a\xffb\nLOGIN \xc3\xa9\nPING\n")
        c.expect("ERR invalid-username", "ERR invalid-username", "PONG")

    def test_username_taken_case_insensitively(self):
        self.user("Naman")
        other = self.client(self.s)
        for name in ["Naman", "naman", "NAMAN", "nAmAn"]:
            other.send("LOGIN " + name)
            other.expect("ERR username-taken")
        other.login("Yudi")                                 # still usable
        other.send("WHO")
        other.expect("USER Naman", "USER Yudi")

    def test_already_logged_in_whatever_the_name(self):
        self.user("bob")
        c = self.user("alice")
        for line in ["LOGIN carol", "LOGIN alice", "LOGIN ALICE", "LOGIN bob", "LOGIN",
                     "LOGIN a b", "LOGIN " + "x" * 40, "LOGIN !!", "login dave"]:
            c.send(line)
            c.expect("ERR already-logged-in")
        c.send("WHO")
        c.expect("USER bob", "USER alice")
        probe = self.client(self.s)
        probe.login("carol")                                # was never taken

    def test_name_free_again_after_disconnect(self):
        obs = self.user("obs")
        a = self.user("Ann")
        a.close()
        obs.expect("INFO Ann disconnected")
        self.client(self.s).login("ann")                    # another case, same name
        obs.send("WHO")
        obs.expect("USER obs", "USER ann")

    def test_failed_login_reserves_nothing(self):
        obs = self.user("obs")
        c = self.client(self.s)
        c.send("LOGIN obs")
        c.expect("ERR username-taken")
        c.send("LOGIN x y")
        c.expect("ERR invalid-username")
        obs.send("DM x hi")
        obs.expect("ERR user-not-found")
        obs.send("WHO")
        obs.expect("USER obs")


class BeforeLogin(ContractCase):

    def test_msg_who_dm_not_logged_in_whatever_the_arguments(self):
        c = self.client(self.s)
        for line in ["MSG hi", "MSG", "MSG   ", "msg \x1b", "WHO", "who is there", "DM",
                     "DM bob", "DM bob hi", "DM a!b hi", "Dm " + "x" * 40 + " hi"]:
            c.send(line)
            c.expect("ERR not-logged-in")

    def test_ping_before_login(self):
        c = self.client(self.s)
        for line in ["PING", "ping", "Ping now", "  PING"]:
            c.send(line)
            c.expect("PONG")

    def test_unknown_command_before_login(self):
        c = self.client(self.s)
        for line in ["HELLO", "hello there", "USER x", "OK", "LOGINbob", "MSGhi"]:
            c.send(line)
            c.expect("ERR unknown-command")

    def test_blank_lines_ignored_before_login(self):
        c = self.client(self.s)
        c.sendraw(b"\n   \n\t\n \t \n\r\nPING\n")
        c.expect("PONG")

    def test_no_msg_dm_or_info_before_login(self):
        obs = self.user("obs")
        pre = self.anon()
        x = self.user("x")
        x.send("MSG hello all", "DM obs psst")
        x.expect_nothing_more()            # the broker has routed both
        x.close()
        obs.expect("MSG x hello all", "DM x psst", "INFO x disconnected")
        pre.login("pre")                   # OK: nothing of the above came first
        pre.expect_nothing_more()
        obs.send("DM pre after")
        pre.expect("DM obs after")

    def test_dm_to_a_connection_that_is_not_logged_in(self):
        obs = self.user("obs")
        pre = self.anon()
        pre.send("LOGIN ghost ghost")
        pre.expect("ERR invalid-username")
        obs.send("DM ghost hi")
        obs.expect("ERR user-not-found")


class Messages(ContractCase):

    def test_msg_to_every_other_logged_in_user(self):
        a, b, c = self.user("a"), self.user("b"), self.user("c")
        a.send("MSG hi everyone!")
        b.expect("MSG a hi everyone!")
        c.expect("MSG a hi everyone!")
        a.expect_nothing_more()           # no echo to the sender
        b.expect_nothing_more()
        c.expect_nothing_more()

    def test_msg_case_insensitive_command(self):
        a, b = self.user("a"), self.user("b")
        a.send("msg one", "Msg two", "mSG three")
        b.expect("MSG a one", "MSG a two", "MSG a three")

    def test_msg_text_trimmed_inner_spacing_kept(self):
        a, b = self.user("a"), self.user("b")
        a.send("MSG   hi   there  ")
        a.send("MSG\t\tx \t y\t ")
        a.send("   MSG \t lead")
        b.expect("MSG a hi   there", "MSG a x \t y", "MSG a lead")

    def test_empty_message(self):
        a, b = self.user("a"), self.user("b")
        for line in ["MSG", "MSG ", "MSG     ", "MSG\t", "MSG \t \t", "msg",
                     "DM", "DM b", "DM b ", "DM b \t ", "DM\tb\t", "DM nobody", "dm"]:
            a.send(line)
            a.expect("ERR empty-message")
        b.expect_nothing_more()

    def test_msg_order_from_one_sender(self):
        a, b = self.user("a"), self.user("b")
        a.send(*["MSG %d" % i for i in range(200)])
        b.expect(*["MSG a %d" % i for i in range(200)])
        b.expect_nothing_more()


class DirectMessages(ContractCase):

    def test_dm_reaches_only_its_target(self):
        yudi, naman, third = self.user("Yudi"), self.user("Naman"), self.user("third")
        yudi.send("DM Naman secret message")
        naman.expect("DM Yudi secret message")
        yudi.expect_nothing_more()
        third.expect_nothing_more()
        naman.expect_nothing_more()

    def test_dm_lookup_case_insensitive_name_as_typed(self):
        alice, bob = self.user("AlIcE"), self.user("bob")
        bob.send("DM alice hi", "DM ALICE there", "dm aLiCe x")
        alice.expect("DM bob hi", "DM bob there", "DM bob x")
        alice.send("DM BOB back")
        bob.expect("DM AlIcE back")

    def test_dm_to_oneself(self):
        a, b = self.user("Me"), self.user("b")
        a.send("DM Me note to self", "DM me again")
        a.expect("DM Me note to self", "DM Me again")
        b.expect_nothing_more()

    def test_dm_spacing(self):
        a, b = self.user("a"), self.user("b")
        a.send("DM   b   hello   world  ")
        a.send("DM\tb\t\tx \t y\t")
        b.expect("DM a hello   world", "DM a x \t y")

    def test_user_not_found(self):
        a = self.user("a")
        for line in ["DM nobody hi", "DM a! hi", "DM " + "x" * 33 + " hi", "DM aa hi",
                     "DM caf\u00e9 hi"]:
            a.send(line)
            a.expect("ERR user-not-found")

    def test_user_not_found_after_disconnect(self):
        a, b = self.user("a"), self.user("gone")
        b.close()
        a.expect("INFO gone disconnected")
        a.send("DM gone hi")
        a.expect("ERR user-not-found")


class Who(ContractCase):

    def test_who_in_login_order_sender_included(self):
        names = ["Naman", "yudi", "Zed", "adam"]
        clients = [self.user(n) for n in names]
        for c in clients:
            c.send("WHO")
            c.expect(*["USER " + n for n in names])

    def test_who_after_disconnects_and_relogin(self):
        a, b, c = self.user("a"), self.user("b"), self.user("c")
        b.close()
        a.expect("INFO b disconnected")
        c.send("WHO")
        c.expect("INFO b disconnected", "USER a", "USER c")
        self.user("B")
        a.send("who")
        a.expect("USER a", "USER c", "USER B")

    def test_words_after_who_ignored(self):
        a = self.user("a")
        a.send("WHO is online", "WHO\tnow")
        a.expect("USER a", "USER a")


class Commands(ContractCase):

    def test_ping(self):
        a = self.user("a")
        for line in ["PING", "ping", "PiNg", "PING with words", "\tPING"]:
            a.send(line)
            a.expect("PONG")

    def test_unknown_command(self):
        a, b = self.user("a"), self.user("b")
        for line in ["HELLO", "hello world", "MSGX hi", "LOGINbob", "PINGPONG", "WHOM",
                     "USER a", "INFO a disconnected", "PONG", "OK", "DMb hi", "QUITS"]:
            a.send(line)
            a.expect("ERR unknown-command")
        b.expect_nothing_more()

    def test_blank_lines_ignored(self):
        a, b = self.user("a"), self.user("b")
        a.sendraw(b"\n  \n\t\n \t \n\r\nPING\n")
        a.expect("PONG")
        b.expect_nothing_more()

    def test_whitespace_is_space_and_tab(self):
        obs = self.user("obs")
        c = self.client(self.s)
        c.send("  \tLOGIN\t\tws  \t")
        c.expect("OK")
        c.send("\t MSG \t hi \t there \t")
        c.send(" DM\tobs\t\tyo  yo\t")
        c.send("\tPING", "  WHO  ")
        c.expect("PONG", "USER obs", "USER ws")
        obs.expect("MSG ws hi \t there", "DM ws yo  yo")

    def test_other_blanks_are_not_whitespace(self):
        a, b = self.user("a"), self.user("b")
        a.sendraw(b"MSG\x0bhi\n\x0cPING\nMSG \x0bx\x0c\n")
        a.expect("ERR unknown-command", "ERR unknown-command")
        b.expect("MSG a %sx%s" % (FFFD, FFFD))


class Quit(ContractCase):

    def test_quit_flushes_then_closes_and_ignores_later_lines(self):
        a, obs = self.user("a"), self.user("obs")
        a.sendraw(b"PING\nWHO\nDM obs bye\nQUIT\nPING\nMSG after quit\nDM obs late\n")
        self.assertEqual(a.expect_closed(), ["PONG", "USER a", "USER obs"])
        obs.expect("DM a bye", "INFO a disconnected")
        obs.expect_nothing_more()

    def test_quit_with_words_and_any_case(self):
        a, obs = self.user("a"), self.user("obs")
        a.send("quit see you")
        self.assertEqual(a.expect_closed(), [])
        obs.expect("INFO a disconnected")
        obs.expect_nothing_more()

    def test_quit_before_login(self):
        obs = self.user("obs")
        c = self.client(self.s)
        c.sendraw(b"PING\nQUIT\nLOGIN late\n")
        self.assertEqual(c.expect_closed(), ["PONG"])
        self.client(self.s).login("late")                  # the LOGIN never ran
        obs.expect_nothing_more()                          # and no INFO for c


class Disconnects(ContractCase):

    def test_info_once_after_every_msg(self):
        obs, other = self.user("obs"), self.user("other")
        a = self.user("a")
        a.send(*["MSG %d" % i for i in range(50)])
        a.close()
        expected = ["MSG a %d" % i for i in range(50)] + ["INFO a disconnected"]
        obs.expect(*expected)
        other.expect(*expected)
        obs.expect_nothing_more()
        other.expect_nothing_more()

    def test_no_info_for_users_never_logged_in(self):
        obs = self.user("obs")
        c = self.anon()
        c.send("QUIT")
        c.expect_closed()
        obs.expect_nothing_more()


class Pipelining(ContractCase):

    def test_login_who_ping_in_one_packet(self):
        self.user("first")
        c = self.client(self.s)
        c.sendraw(b"LOGIN a\nWHO\nPING\n")
        c.expect("OK", "USER first", "USER a", "PONG")

    def test_answers_in_command_order(self):
        obs = self.user("obs")
        c = self.client(self.s)
        c.sendraw(b"PING\nWHO\nLOGIN p\nLOGIN q\nWHO\nDM nobody x\nDM obs hello\n"
                  b"MSG m1\nPING\nDM P self\nFOO\nMSG\nWHO\nPING\nQUIT\nPING\n")
        self.assertEqual(c.expect_closed(), [
            "PONG", "ERR not-logged-in", "OK", "ERR already-logged-in",
            "USER obs", "USER p", "ERR user-not-found", "PONG", "DM p self",
            "ERR unknown-command", "ERR empty-message", "USER obs", "USER p", "PONG"])
        obs.expect("DM p hello", "MSG p m1", "INFO p disconnected")
        obs.expect_nothing_more()

    def test_many_lines_in_one_packet(self):
        obs = self.user("obs")
        a = self.user("a")
        a.sendraw(b"".join(b"MSG %d\nPING\nDM obs d%d\n" % (i, i) for i in range(300)))
        a.expect(*["PONG"] * 300)
        expected = []
        for i in range(300):
            expected += ["MSG a %d" % i, "DM a d%d" % i]
        obs.expect(*expected)


class HalfClose(ContractCase):

    def test_answers_arrive_then_close_then_info(self):
        obs = self.user("obs")
        c = self.client(self.s)
        c.sendraw(b"LOGIN h\nWHO\nDM obs hi\nMSG bye\nPING\n")
        c.sock.shutdown(socket.SHUT_WR)
        self.assertEqual(c.expect_closed(), ["OK", "USER obs", "USER h", "PONG"])
        obs.expect("DM h hi", "MSG h bye", "INFO h disconnected")
        obs.expect_nothing_more()

    def test_half_close_before_login(self):
        obs = self.user("obs")
        c = self.client(self.s)
        c.sendraw(b"PING\nWHO\nFOO\n")
        c.sock.shutdown(socket.SHUT_WR)
        self.assertEqual(c.expect_closed(),
                         ["PONG", "ERR not-logged-in", "ERR unknown-command"])
        obs.expect_nothing_more()

    def test_half_close_with_unterminated_last_line(self):
        # Only complete lines are commands; the rest is dropped at close.
        obs = self.user("obs")
        c = self.client(self.s)
        c.sendraw(b"LOGIN h\nPING\nMSG no newline")
        c.sock.shutdown(socket.SHUT_WR)
        self.assertEqual(c.expect_closed(), ["OK", "PONG"])
        obs.expect("INFO h disconnected")
        obs.expect_nothing_more()


class Telnet(ContractCase):

    def test_crlf_lines(self):
        obs = self.user("obs")
        t = self.client(self.s)
        t.sendraw(b"LOGIN t\r\n")
        t.expect("OK")
        t.sendraw(b"MSG hi there \r\nDM obs x y\r\n\r\nWHO\r\nPING\r\nDM t me\r\n")
        t.expect("USER obs", "USER t", "PONG", "DM t me")
        obs.expect("MSG t hi there", "DM t x y")
        t.sendraw(b"QUIT\r\n")
        self.assertEqual(t.expect_closed(), [])
        obs.expect("INFO t disconnected")

    def test_only_one_cr_is_the_terminator(self):
        a, b = self.user("a"), self.user("b")
        a.sendraw(b"MSG x\r\r\nMSG y\rz\r\n")
        b.expect("MSG a x" + FFFD, "MSG a y%sz" % FFFD)


class LineTooLong(ContractCase):

    def test_default_limit_4096_counts_newline_and_cr(self):
        a, obs = self.user("a"), self.user("obs")
        a.sendraw(b"MSG " + b"a" * 4091 + b"\n"            # 4096 bytes: fits
                  + b"MSG " + b"b" * 4092 + b"\n"          # 4097: too long
                  + b"MSG " + b"c" * 4090 + b"\r\n"        # 4096 with CR: fits
                  + b"MSG " + b"d" * 4091 + b"\r\n"        # 4097 with CR: too long
                  + b"PING\n")
        a.expect("ERR line-too-long", "ERR line-too-long", "PONG")
        obs.expect("MSG a " + "a" * 4091, "MSG a " + "c" * 4090)
        obs.expect_nothing_more()

    def test_connection_stays_usable(self):
        a, obs = self.user("a"), self.user("obs")
        a.sendraw(b"MSG " + b"x" * 100000 + b"\nMSG after\n")
        a.expect("ERR line-too-long")
        obs.expect("MSG a after")
        a.send("WHO")
        a.expect("USER a", "USER obs")

    def test_reported_when_its_newline_arrives(self):
        a, obs = self.user("a"), self.user("obs")
        for _ in range(10):
            a.sendraw(b"y" * 3000)                          # no newline yet
        a.sendraw(b"zzz\nPING\n")
        a.expect("ERR line-too-long", "PONG")
        obs.expect_nothing_more()

    def test_before_login(self):
        c = self.client(self.s)
        c.sendraw(b"LOGIN " + b"n" * 5000 + b"\nPING\nLOGIN n\n")
        c.expect("ERR line-too-long", "PONG", "OK")


class MaxLineOption(ContractCase):
    server_args = ("--max-line", "32")

    def test_limit_from_the_option(self):
        a, obs = self.user("a"), self.user("obs")
        a.sendraw(b"MSG " + b"a" * 27 + b"\n"              # 32 bytes
                  + b"MSG " + b"b" * 28 + b"\n"            # 33
                  + b"MSG " + b"c" * 26 + b"\r\n"          # 32 with CR
                  + b"MSG " + b"d" * 27 + b"\r\n"          # 33 with CR
                  + b"PING\n")
        a.expect("ERR line-too-long", "ERR line-too-long", "PONG")
        obs.expect("MSG a " + "a" * 27, "MSG a " + "c" * 26)
        obs.expect_nothing_more()


class TextSanitising(ContractCase):

    def test_invalid_utf8_in_msg_and_dm(self):
        a, obs = self.user("a"), self.user("obs")
        a.sendraw(b"MSG a\xffb \xc3(c \x80\nDM obs x\xfey\n")
        self.assertEqual(obs.read_raw_line().decode("utf-8"),
                         "MSG a a%sb %s(c %s" % (FFFD, FFFD, FFFD))
        self.assertEqual(obs.read_raw_line().decode("utf-8"), "DM a x%sy" % FFFD)
        a.send("PING")
        a.expect("PONG")

    def test_invalid_utf8_in_command_word(self):
        a = self.user("a")
        # (0xff 0xfe would be telnet's IAC DONT, taking the \n as its option.)
        a.sendraw(b"\xfe\xff\nM\xffG hi\nPING\n")
        a.expect("ERR unknown-command", "ERR unknown-command", "PONG")

    def test_valid_utf8_untouched(self):
        a, obs = self.user("a"), self.user("obs")
        text = "caf\u00e9 \u4e2d\u6587 \U0001F600 \u00a0nbsp \u200e"
        a.send("MSG " + text, "DM obs " + text)
        obs.expect("MSG a " + text, "DM a " + text)

    def test_control_characters_and_bidi(self):
        a, obs = self.user("a"), self.user("obs")
        raw = ("x\x1b[31my\x00z\x7f\u0085\u009b\u202e\u202a\u2066\u2069\x07\x08\ta\rb"
               "\x01c").encode()
        a.sendraw(b"MSG " + raw + b"\nDM obs " + raw + b"\n")
        clean = ("x{0}[31my{0}z{0}{0}{0}{0}{0}{0}{0}{0}{0}\ta{0}b{0}c").format(FFFD)
        for prefix in ("MSG a ", "DM a "):
            line = obs.read_raw_line()
            for byte in line:
                self.assertFalse(byte < 0x20 and byte != 0x09 or byte == 0x7F, line)
            self.assertEqual(line.decode("utf-8"), prefix + clean)

    def test_every_control_character(self):
        a, obs = self.user("a"), self.user("obs")
        codes = [c for c in range(0x20) if c not in (0x09, 0x0A)] + [0x7F] + \
            list(range(0x80, 0xA0)) + list(range(0x202A, 0x202F)) + list(range(0x2066, 0x206A))
        a.sendraw(b"".join(("MSG <%s>\n" % chr(c)).encode() for c in codes))
        obs.expect(*["MSG a <%s>" % FFFD for _ in codes])

    def test_neighbours_kept(self):
        a, obs = self.user("a"), self.user("obs")
        text = "\u00a0\u2029\u202f\u2065\u206a"
        a.send("MSG <%s>" % text)
        obs.expect("MSG a <%s>" % text)


class Names(ContractCase):

    def test_case_insensitive_unique_shown_as_typed(self):
        alice = self.user("Alice")
        bob = self.user("bob")
        c = self.client(self.s)
        for name in ["alice", "ALICE", "aLIce", "BOB"]:
            c.send("LOGIN " + name)
            c.expect("ERR username-taken")
        alice.send("MSG hello")
        bob.expect("MSG Alice hello")
        bob.send("DM aLiCe hi", "WHO")
        alice.expect("DM bob hi")
        bob.expect("USER Alice", "USER bob")
        alice.send("QUIT")
        alice.expect_closed()
        bob.expect("INFO Alice disconnected")


class IdleTimeout(ContractCase):
    idle_timeout = 0.5
    server_args = ("--max-line", "64")
    STEP = 0.1

    def keep_alive(self, c, line, answer, duration):
        """Send ``line`` every STEP seconds for ``duration``, checking answers."""
        deadline = time.monotonic() + duration
        while time.monotonic() < deadline:
            c.sendraw(line)
            if answer is not None:
                c.expect(answer)
            time.sleep(self.STEP)

    def test_before_login(self):
        start = time.monotonic()
        c = self.client(self.s)
        self.assertEqual(c.expect_closed(), ["ERR idle-timeout"])
        self.assertGreaterEqual(time.monotonic() - start, 0.45)

    def test_logged_in_user_cut_and_announced(self):
        obs = self.user("obs")
        idle = self.user("idle")
        start = time.monotonic()
        got = []
        while "INFO idle disconnected" not in got:         # obs keeps itself alive
            self.assertLess(time.monotonic() - start, 5, got)
            obs.send("PING")
            line = obs.read_line()
            while line != "PONG":
                got.append(line)
                line = obs.read_line()
            time.sleep(self.STEP)
        self.assertEqual(got, ["INFO idle disconnected"])
        self.assertGreaterEqual(time.monotonic() - start, 0.4)
        self.assertEqual(idle.expect_closed(), ["ERR idle-timeout"])
        obs.expect_nothing_more()

    def test_trickled_line_does_not_reset(self):
        c = self.client(self.s)
        start = time.monotonic()
        while True:
            elapsed = time.monotonic() - start
            self.assertLess(elapsed, 3, "trickling bytes kept the connection alive")
            readable, _, _ = select.select([c.sock], [], [], self.STEP)
            if readable:
                break
            try:
                c.sendraw(b"x")                            # never a newline
            except OSError:
                break
        self.assertEqual(c.expect_closed(), ["ERR idle-timeout"])
        self.assertLess(time.monotonic() - start, 2)

    def test_complete_lines_reset(self):
        c = self.client(self.s)
        self.keep_alive(c, b"PING\n", "PONG", 1.2)
        self.keep_alive(c, b"\n", None, 1.2)                # empty lines count too
        c.send("PING")
        c.expect("PONG")
        self.keep_alive(c, b"x" * 100 + b"\n", "ERR line-too-long", 1.2)   # so do discarded ones
        c.send("LOGIN alive")
        c.expect("OK")
        self.keep_alive(c, b"DM alive x\n", "DM alive x", 1.2)
        self.assertEqual(c.expect_closed(), ["ERR idle-timeout"])


class ServerFull(ContractCase):
    server_args = ("--max-clients", "2")

    def test_server_full(self):
        a = self.user("a")
        b = self.anon()
        extra = self.client(self.s)
        self.assertEqual(extra.expect_closed(), ["ERR server-full"])
        a.expect_nothing_more()
        a.send("WHO")
        a.expect("USER a")
        b.close()
        # The slot comes free once the server has noticed the close.
        c = served_once_free(lambda: self.client(self.s), "ERR server-full")
        c.login("c")
        a.send("WHO")
        a.expect("USER a", "USER c")


class SlowConsumer(ContractCase):
    server_args = ("--max-pending", "65536")
    BODY = "x" * 3900
    BATCH = 50
    MAX_LINES = 4000

    def flood_until_cut(self):
        """flooder floods; obs reads everything; sleeper never reads."""
        self.sleeper = self.user("sleeper")
        flooder, obs = self.user("flooder"), self.user("obs")
        n, cut = 0, False
        while not cut:
            self.assertLess(n, self.MAX_LINES, "sleeper never cut")
            flooder.send(*["MSG %d %s" % (n + i, self.BODY) for i in range(self.BATCH)])
            for i in range(self.BATCH):
                line = obs.read_line()
                if line == "INFO sleeper disconnected":
                    self.assertFalse(cut, "INFO twice")
                    cut = True
                    line = obs.read_line()
                if line != "MSG flooder %d %s" % (n + i, self.BODY):
                    self.fail("obs lost or got a wrong line at %d: %r" % (n + i, line[:60]))
            n += self.BATCH
        obs.expect_nothing_more()          # nothing lost, no second INFO
        flooder.expect("INFO sleeper disconnected")
        flooder.expect_nothing_more()
        return read_until_eof(self.sleeper)

    def check_prefix(self, lines):
        for i, line in enumerate(lines):
            if line != b"MSG flooder %d %s" % (i, self.BODY.encode()):
                self.fail("sleeper line %d is %r" % (i, line[:60]))

    def test_slow_consumer_is_cut_others_lose_nothing(self):
        data = self.flood_until_cut()
        lines = data.split(b"\n")
        lines.pop()                        # what follows the last newline
        if lines and lines[-1] == b"ERR slow-consumer":
            lines.pop()
        self.check_prefix(lines)

    def test_slow_consumer_gets_err_line_last(self):
        data = self.flood_until_cut()
        self.assertTrue(data.endswith(b"\nERR slow-consumer\n"),
                        "sleeper's data ends with %r" % data[-80:])
        self.check_prefix(data.split(b"\n")[:-2])


class CommandLine(TestCase):

    def test_help(self):
        code, out, err = run_broker("--help")
        self.assertEqual(code, 0, err)
        for option in OPTIONS:
            self.assertRegex(out, r"(^|[\s,\[])%s\b" % option, "help does not mention " + option)
        self.assertIn("default", out.lower())
        self.assertIn("4000", out)

    def test_bad_values_exit_2_with_one_line_error(self):
        bad = [["--port", "-1"], ["--port", "65536"], ["--port", "abc"], ["-p", ""],
               ["--workers", "0"], ["--workers", "-2"], ["-w", "many"],
               ["--idle-timeout", "0"], ["--idle-timeout", "-1"], ["-t", "soon"],
               ["--max-clients", "0"], ["--max-clients", "x"], ["--max-line", "abc"],
               ["--max-line", "0"], ["--max-pending", "-5"], ["--max-pending", "lots"],
               ["--start-method", "teleport"], ["--log-level", "LOUD"], ["--no-such-option"],
               ["stray-argument"]]
        for args in bad:
            with self.subTest(args=args):
                code, out, err = run_broker("--host", "127.0.0.1", "--port", "0", *args)
                self.check_usage_error(code, err)

    def test_bad_port_environment_variable(self):
        for value in ("abc", "70000", "-3"):
            with self.subTest(PORT=value):
                code, out, err = run_broker("--host", "127.0.0.1", "--workers", "1",
                                            env={"PORT": value})
                self.check_usage_error(code, err)

    def check_usage_error(self, code, err):
        self.assertEqual(code, 2, err)
        self.assertNotIn("Traceback", err)
        errors = [line for line in err.splitlines() if line.startswith("broker.py: error")]
        self.assertEqual(len(errors), 1, err)

    def test_port_zero_prints_the_real_port(self):
        s = self.server(workers=1)
        self.assertNotEqual(s.port, 0)
        self.assertIn("listening on 127.0.0.1:%d" % s.port, s.log())
        c = self.client(s)
        c.send("PING")
        c.expect("PONG")

    def server_without_port_flag(self, *args, env):
        s = Server(*args, workers=1, env=env)
        i = s.args.index("--port")
        del s.args[i:i + 2]
        return self.launched(s).wait_ready()

    def test_port_environment_variable(self):
        port = free_port()
        s = self.server_without_port_flag(env={"PORT": str(port)})
        self.assertEqual(s.port, port)
        c = self.client(s)
        c.send("PING")
        c.expect("PONG")

    def test_port_flag_beats_environment(self):
        env_port, flag_port = free_port(), free_port()
        s = self.server_without_port_flag("--port", flag_port, env={"PORT": str(env_port)})
        self.assertEqual(s.port, flag_port)


class MultiWorker(TestCase):
    """Several workers; also run under every start method (classes below)."""

    start_method = None
    workers = 3

    def start(self):
        return self.server(workers=self.workers, start_method=self.start_method)

    def test_spread_and_routing_across_workers(self):
        s = self.start()
        names = ["u%d" % i for i in range(6)]
        users = [self.client(s, n) for n in names]
        holders = [worker_of(s, u) for u in users]
        self.assertTrue(all(h and h.startswith("chat-worker") for h in holders), holders)
        counts = [holders.count(h) for h in set(holders)]
        self.assertEqual(len(counts), self.workers, holders)
        self.assertLessEqual(max(counts) - min(counts), 1, holders)
        chat_among(users)
        # a disconnect: one INFO each, gone from every WHO
        users[2].close()
        rest = users[:2] + users[3:]
        for u in rest:
            u.expect("INFO u2 disconnected")
        for u in rest:
            u.send("WHO")
            u.expect(*["USER " + n for n in names if n != "u2"])
            u.expect_nothing_more()

    def test_new_login_seen_at_once_by_every_worker(self):
        s = self.start()
        users = [self.client(s, "u%d" % i) for i in range(3)]
        for i in range(3):
            self.client(s, "late%d" % i)
            for u in users:
                u.send("WHO")
                u.expect(*["USER u%d" % j for j in range(3)] +
                         ["USER late%d" % j for j in range(i + 1)])

    def test_order_from_each_sender_across_workers(self):
        s = self.start()
        a, b, r1, r2 = (self.client(s, n) for n in ("a", "b", "r1", "r2"))
        a.send(*["MSG a%d" % i for i in range(300)])
        b.send(*["MSG b%d" % i for i in range(300)])
        for r in (r1, r2):
            got = r.read_lines(600)
            self.assertEqual([x for x in got if x.startswith("MSG a ")],
                             ["MSG a a%d" % i for i in range(300)])
            self.assertEqual([x for x in got if x.startswith("MSG b ")],
                             ["MSG b b%d" % i for i in range(300)])
        a.expect(*["MSG b b%d" % i for i in range(300)])
        b.expect(*["MSG a a%d" % i for i in range(300)])
        a.send(*["MSG last%d" % i for i in range(100)])
        a.close()                               # nothing unread: a clean FIN
        for r in (b, r1, r2):
            r.expect(*["MSG a last%d" % i for i in range(100)] + ["INFO a disconnected"])
            r.expect_nothing_more()

    def test_pipelining_across_workers(self):
        s = self.start()
        others = [self.client(s, "o%d" % i) for i in range(3)]
        c = self.client(s)
        c.sendraw(b"LOGIN a\nWHO\nPING\nDM o0 x\nDM o1 y\nDM o2 z\nWHO\nDM a self\nPING\n")
        who = ["USER o0", "USER o1", "USER o2", "USER a"]
        c.expect("OK", *who, "PONG", *who, "DM a self", "PONG")
        for o, text in zip(others, "xyz"):
            o.expect("DM a " + text)
            o.expect_nothing_more()

    def test_login_race_exactly_one_ok(self):
        s = self.start()
        racers = [self.client(s) for _ in range(30)]
        for r in racers:                        # every one surely in a worker
            r.send("PING")
        for r in racers:
            r.expect("PONG")
        spellings = ["racer", "Racer", "RACER", "rAcEr"]
        for i, r in enumerate(racers):
            r.send("LOGIN " + spellings[i % 4])
        answers = [r.read_line() for r in racers]
        self.assertEqual(answers.count("OK"), 1, answers)
        self.assertEqual(answers.count("ERR username-taken"), 29, answers)
        winner = racers[answers.index("OK")]
        winner.name = spellings[answers.index("OK") % 4]
        winner.send("WHO")
        winner.expect("USER " + winner.name)
        winner.expect_nothing_more()
        self.assertGreater(len({worker_of(s, r) for r in racers}), 1)

    # -- stopping -------------------------------------------------------------

    def check_stop(self, deliver):
        s = self.start()
        a, b = self.client(s, "a"), self.client(s, "b")
        pre = self.client(s)
        pre.send("PING")
        pre.expect("PONG")
        a.send("MSG before")
        b.expect("MSG a before")
        start = time.monotonic()
        deliver(s)
        code = s.proc.wait(10)
        self.assertLess(time.monotonic() - start, 5, "main process took too long")
        self.assertEqual(code, 0)
        for c, other in ((a, "b"), (b, "a")):
            lines = c.expect_closed()
            self.assertEqual(lines[-1:], ["ERR server-shutdown"], lines)
            self.assertTrue(set(lines[:-1]) <= {"INFO %s disconnected" % other}, lines)
        self.assertEqual(pre.expect_closed(), ["ERR server-shutdown"])
        self.wait_all_gone(s, start)
        self.assertTrue(s.wait_log_end())
        self.assertNotIn("Traceback", s.log())

    def wait_all_gone(self, s, start, within=5.0):
        while s.pids():
            if time.monotonic() - start > within:
                self.fail("processes left %.1f s after: %s"
                          % (within, [(p, process_role(p)) for p in s.pids()]))
            time.sleep(0.02)

    def test_sigterm(self):
        self.check_stop(lambda s: s.proc.send_signal(signal.SIGTERM))

    def test_sigint(self):
        self.check_stop(lambda s: s.proc.send_signal(signal.SIGINT))

    def test_ctrl_c_to_the_whole_process_group(self):
        self.check_stop(lambda s: os.killpg(s.proc.pid, signal.SIGINT))

    def test_no_orphans_after_sigkill_of_main(self):
        s = self.start()
        a = self.client(s, "a")
        self.assertGreaterEqual(len(s.pids()), self.workers + 3)
        start = time.monotonic()
        s.proc.kill()
        s.proc.wait(5)
        self.wait_all_gone(s, start)
        a.expect_closed()


per_start_method(globals(), MultiWorker)

if __name__ == "__main__":
    unittest.main()
