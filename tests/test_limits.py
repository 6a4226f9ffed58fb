"""Black-box tests of the defences against abusive clients.

Flood control (``--rate``, ``--burst``: fakelag, then ``ERR flood``),
``--max-per-ip``, ``--login-timeout``, HTTP detection and the back-off when
the server runs out of file descriptors. Each test starts the real server and
talks to it over real sockets, asserting exact lines.

Timing is used only where the defence is about time (a rate, a timeout, a
back-off), with generous margins in the direction that load cannot break:
a slower machine makes a throttled client slower still, never faster.
Descriptor exhaustion is produced with ``prlimit(2)`` on a running server
process, which needs no hook in the server: the server raises its own limit
only once, at start, so a limit lowered afterwards stays.
"""

import os
import resource
import signal
import socket
import sys
import threading
import time
import unittest

from support import IO_TIMEOUT, TestCase, bound_client, served_once_free, usage

FLOOD_GRACE = 10.0       # chatlib.flood.FLOOD_GRACE: seconds over --rate before ERR flood
HAVE_PRLIMIT = hasattr(resource, "prlimit") and sys.platform.startswith("linux")


def lowest_free_fd(pid):
    """The descriptor number ``pid`` would get next."""
    used = {int(fd) for fd in os.listdir("/proc/%d/fd" % pid)}
    return min(set(range(len(used) + 1)) - used)


def closed_without_answer(client):
    """True if the server closed ``client`` (EOF or reset) before any line."""
    try:
        return client.expect_closed() == []
    except OSError:
        return True


class LimitCase(TestCase):

    def pong(self, c, seen=None):
        """A PING round trip; its duration in seconds.

        The lines that come before the PONG (chat, for a logged-in client)
        go to ``seen``; without it, there must be none.
        """
        start = time.monotonic()
        c.send("PING")
        while True:
            line = c.read_line()
            if line == "PONG":
                return time.monotonic() - start
            if seen is None:
                self.fail("%r before PONG" % line)
            seen.append(line)

    def client_from(self, server, source):
        c = bound_client(server.port, source)
        self.addCleanup(c.close)
        return c


class Fakelag(LimitCase):
    RATE, BURST, LINES = 200, 50, 600

    def test_flooder_slowed_loses_nothing_others_answered(self):
        s = self.server("--rate", self.RATE, "--burst", self.BURST, workers=2)
        flooder, obs = self.client(s, "flooder"), self.client(s, "obs")
        pinger = self.client(s, "pinger")
        start = time.monotonic()
        flooder.send(*["MSG %d" % i for i in range(self.LINES)])
        slowest, seen = 0.0, []
        for i in range(self.LINES):
            line = obs.read_line()
            if line != "MSG flooder %d" % i:
                self.fail("obs got %r where it expected line %d" % (line, i))
            if i % 100 == 50:             # mid-flood: others are still served
                slowest = max(slowest, self.pong(pinger, seen))
        elapsed = time.monotonic() - start
        # Only the burst goes at once; the rest at --rate at most.
        floor = (self.LINES - self.BURST) / self.RATE
        self.assertGreater(elapsed, floor * 0.8, "the flooder was not slowed down")
        self.assertLess(slowest, 1.0, "a PING waited behind the flooder")
        self.assertLess(elapsed, FLOOD_GRACE, "this flood should not take that long")
        seen += pinger.read_lines(self.LINES - len(seen))
        self.assertEqual(seen, ["MSG flooder %d" % i for i in range(self.LINES)])
        for c in (flooder, obs, pinger):
            c.expect_nothing_more()
        self.assertNotIn("flood)", s.log())

    def test_burst_goes_through_at_once(self):
        # At --rate 0.1 one more line takes 10 s: the burst must not wait.
        s = self.server("--rate", 0.1, "--burst", 100, workers=1)
        flooder, obs = self.client(s, "flooder"), self.client(s, "obs")
        flooder.send(*["MSG %d" % i for i in range(99)])   # LOGIN took a token
        obs.expect(*["MSG flooder %d" % i for i in range(99)])
        obs.expect_nothing_more()


class HeldLinesAreNotIdle(LimitCase):
    """The idle timeout counts from the last line the server ran: a client
    whose lines are still held (by flood control, or behind a request the
    broker has not answered) is not idle, however long that takes."""

    def test_lines_held_by_flood_control(self):
        # 100 PINGs at 20 a second take 4 s: four idle timeouts.
        s = self.server("--rate", 20, "--burst", 20, workers=1, idle_timeout=1)
        c = self.client(s)
        c.send(*["PING"] * 100)
        got = [c.read_line()]
        while got[-1] == "PONG" and len(got) < 100:
            got.append(c.read_line())
        self.assertEqual((len(got), got[-1]), (100, "PONG"), "the last of %d lines" % len(got))
        last_run = time.monotonic()
        # Nothing left to run: from now on it is idle.
        self.assertEqual(c.expect_closed(), ["ERR idle-timeout"])
        self.assertGreater(time.monotonic() - last_run, 0.5)

    def test_request_waiting_for_the_broker(self):
        s = self.server(workers=1, idle_timeout=1)
        a = self.client(s, "a")
        broker = s.roles()["chat-broker"]
        os.kill(broker, signal.SIGSTOP)                 # WHO waits for the broker
        self.addCleanup(os.kill, broker, signal.SIGCONT)
        a.send("WHO")
        late = self.client(s)
        late.send("PING")
        late.expect("PONG")
        # Once `late`, whose last line came after a's WHO, is cut for being
        # idle, the idle timeout has passed for `a` too.
        self.assertEqual(late.expect_closed(), ["ERR idle-timeout"])
        os.kill(broker, signal.SIGCONT)
        a.expect("USER a")
        a.send("PING")
        a.expect("PONG")


class FloodCut(LimitCase):
    """A client far over the limit for FLOOD_GRACE seconds is cut (about 11 s)."""

    RATE, BURST, LINES = 100, 20, 30000

    def test_err_flood_then_info(self):
        s = self.server("--rate", self.RATE, "--burst", self.BURST, workers=2)
        flooder, obs = self.client(s, "flooder"), self.client(s, "obs")
        bystander = self.client(s, "bystander")
        # Short lines: one read of the flooder's socket holds thousands of
        # them, more than --rate lets through in FLOOD_GRACE seconds.
        data = b"".join(b"MSG %d\n" % i for i in range(self.LINES))

        def flood():
            try:
                flooder.sock.settimeout(3 * FLOOD_GRACE)
                flooder.sock.sendall(data)
            except OSError:
                pass                       # cut while sending: expected
        start = time.monotonic()
        sender = threading.Thread(target=flood, daemon=True)
        sender.start()
        n, next_ping, seen = 0, 100, []
        while True:
            line = obs.read_line()
            if line == "INFO flooder disconnected":
                break
            self.assertEqual(line, "MSG flooder %d" % n)
            n += 1
            if n == next_ping:
                next_ping += 200
                self.assertLess(self.pong(bystander, seen), 1.0)
        took = time.monotonic() - start
        self.assertGreater(took, FLOOD_GRACE * 0.9, "cut before the grace period")
        self.assertLess(took, FLOOD_GRACE * 2 + 5, "cut far too late")
        # Roughly BURST + RATE * FLOOD_GRACE lines went through, in order.
        self.assertGreater(n, self.RATE * FLOOD_GRACE / 2)
        self.assertLess(n, self.LINES)
        try:
            self.assertEqual(flooder.expect_closed(), ["ERR flood"])
        except ConnectionResetError:
            pass                            # the reset overtook the line: rare
        sender.join(IO_TIMEOUT)
        obs.expect_nothing_more()
        seen += bystander.read_lines(n + 1 - len(seen))
        self.assertEqual(seen, ["MSG flooder %d" % i for i in range(n)]
                         + ["INFO flooder disconnected"])
        bystander.expect_nothing_more()
        s.wait_log(r"flooder disconnected \(flood\)")

    def test_long_line_flood_is_cut_too(self):
        s = self.server("--rate", 100, "--burst", 20, workers=1)
        flooder, obs = self.client(s, "flooder"), self.client(s, "obs")
        body = "x" * 200
        stop = time.monotonic() + 3 * FLOOD_GRACE

        def flood():                        # about 10 times --rate, for 30 s
            try:
                flooder.sock.settimeout(3 * FLOOD_GRACE)
                i = 0
                while time.monotonic() < stop:
                    flooder.sock.sendall(b"".join(b"MSG %d %s\n" % (i + k, body.encode())
                                                  for k in range(100)))
                    i += 100
                    time.sleep(0.1)
            except OSError:
                pass
        threading.Thread(target=flood, daemon=True).start()
        while True:
            line = obs.read_line(timeout=3 * FLOOD_GRACE)
            if line == "INFO flooder disconnected":
                break
            self.assertLess(time.monotonic(), stop, "never cut")
        self.assertEqual(flooder.expect_closed()[-1:], ["ERR flood"])


class MaxPerIp(LimitCase):

    def test_limit_other_address_and_freed_slot(self):
        s = self.server("--max-per-ip", 3, workers=2)
        first = self.client(s, "first")
        others = [self.client(s) for _ in range(2)]
        for c in others:
            self.pong(c)
        extra = self.client(s)
        self.assertEqual(extra.expect_closed(), ["ERR too-many-connections"])
        # Another address has its own count.
        elsewhere = [self.client_from(s, "127.0.0.2") for _ in range(3)]
        for c in elsewhere:
            self.pong(c)
        elsewhere[0].login("elsewhere")
        self.assertEqual(self.client_from(s, "127.0.0.2").expect_closed(),
                         ["ERR too-many-connections"])
        first.send("WHO")
        first.expect("USER first", "USER elsewhere")
        # A close frees exactly one slot; the refused ones took none.
        others[0].close()
        served_once_free(lambda: self.client(s), "ERR too-many-connections")
        self.assertEqual(self.client(s).expect_closed(), ["ERR too-many-connections"])
        # A logged-in user's close frees one too, and is announced as usual.
        first.close()
        elsewhere[0].expect("INFO first disconnected")
        again = served_once_free(lambda: self.client(s), "ERR too-many-connections")
        again.login("again")
        elsewhere[0].expect_nothing_more()

    def test_default_is_64(self):
        s = self.server(workers=2)
        conns = [self.client(s) for _ in range(64)]
        for c in conns:
            c.send("PING")
        for c in conns:
            c.expect("PONG")
        self.assertEqual(self.client(s).expect_closed(), ["ERR too-many-connections"])

    def test_zero_means_no_limit(self):
        s = self.server("--max-per-ip", 0, workers=2)
        conns = [self.client(s) for _ in range(80)]
        for c in conns:
            c.send("PING")
        for c in conns:
            c.expect("PONG")


class LoginTimeout(LimitCase):

    def test_cut_if_not_logged_in_in_time_lines_do_not_help(self):
        s = self.server("--login-timeout", 0.5, "--log-level", "debug", workers=2)
        user = self.client(s, "user")
        start = time.monotonic()
        anon = self.client(s)
        # Complete lines reset the idle timer, not the login timer.
        lines = []
        try:
            while time.monotonic() - start < IO_TIMEOUT:
                anon.send("PING")
                line = anon.read_line(timeout=2.0)
                lines.append(line)
                if line != "PONG":
                    break
                time.sleep(0.05)
        except (AssertionError, OSError):
            pass                      # closed (or reset) while we were pinging
        took = time.monotonic() - start
        self.assertEqual(lines[-1:], ["ERR login-timeout"], lines)
        self.assertEqual(set(lines[:-1]), {"PONG"})
        self.assertGreaterEqual(took, 0.5)
        self.assertGreater(len(lines), 3)
        try:
            self.assertEqual(anon.expect_closed(), [])
        except OSError:
            pass
        s.wait_log(r"disconnected before login \(login timeout\)")
        # The logged-in user, older than the timeout, is not touched, and
        # hears nothing about a connection that never logged in.
        user.expect_nothing_more()

    def test_login_in_time_is_kept(self):
        s = self.server("--login-timeout", 1.0, workers=1)
        slow = self.client(s)
        late = self.client(s)
        slow.login("slow")
        # `late` never logs in: once it is cut, the timeout has passed for
        # `slow` too (connected earlier), and `slow` must still be served.
        self.assertEqual(late.expect_closed(), ["ERR login-timeout"])
        slow.expect_nothing_more()
        slow.send("WHO")
        slow.expect("USER slow")

    def test_zero_disables_it(self):
        # Only the idle timeout is left: PINGs keep the connection, silence ends it.
        s = self.server("--login-timeout", 0, workers=1, idle_timeout=1.5)
        anon = self.client(s)
        until = time.monotonic() + 2.5
        while time.monotonic() < until:
            self.pong(anon)
            time.sleep(0.2)
        self.assertEqual(anon.expect_closed(), ["ERR idle-timeout"])


class HttpDetection(LimitCase):

    def test_browser_request_answered_and_closed(self):
        s = self.server(workers=1)
        requests = [
            b"GET / HTTP/1.1\r\nHost: localhost:4000\r\nUser-Agent: curl/8\r\nAccept: */*\r\n\r\n",
            b"GET /favicon.ico HTTP/1.0\r\n\r\n",
            b"POST /api/chat HTTP/1.1\r\nContent-Length: 9\r\n\r\nLOGIN bob\n",
            b"HEAD / HTTP/1.1\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\n\r\n",
            b"CONNECT example.com:443 HTTP/1.1\r\n\r\n",
            b"GET / HTTP/2\n",
        ]
        for request in requests:
            with self.subTest(request=request[:30]):
                c = self.client(s)
                c.sendraw(request)
                # Nothing after the request line is run: no LOGIN, no
                # unknown-command for the headers.
                self.assertEqual(c.expect_closed(), ["ERR not-a-chat-client"])
        c = self.client(s, "bob")          # the POSTed LOGIN did not take the name
        c.expect_nothing_more()

    def test_before_login_even_after_other_lines(self):
        s = self.server(workers=1)
        c = self.client(s)
        c.sendraw(b"PING\nGET / HTTP/1.1\nPING\n")
        self.assertEqual(c.expect_closed(), ["PONG", "ERR not-a-chat-client"])

    def test_logged_in_user_just_gets_unknown_command(self):
        s = self.server(workers=1)
        a, b = self.client(s, "a"), self.client(s, "b")
        a.send("GET / HTTP/1.1")
        a.expect("ERR unknown-command")
        a.expect_nothing_more()
        b.expect_nothing_more()

    def test_near_misses_are_ordinary_unknown_commands(self):
        s = self.server(workers=1)
        c = self.client(s)
        for line in ["GET /", "GET", "GET / HTTP", "GET / FTP/1.1", "GET  / HTTP/1.1 x"]:
            c.send(line)
            c.expect("ERR unknown-command")
        c.expect_nothing_more()


@unittest.skipUnless(HAVE_PRLIMIT, "needs Linux prlimit(2) to starve a running process")
class OutOfDescriptors(LimitCase):

    def starve(self, pid, spare=0):
        """Let ``pid`` open only ``spare`` more descriptors; return the limit
        to restore."""
        try:
            soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (lowest_free_fd(pid) + spare, hard))
        except (PermissionError, OSError) as exc:
            self.skipTest("cannot lower another process's open-file limit: %s" % exc)
        return soft, hard

    def test_acceptor_backs_off_once_and_accepts_again(self):
        s = self.server(workers=1)
        before = s.roles()
        acceptor = before["chat-acceptor"]
        user = self.client(s, "user")
        limits = self.starve(acceptor)
        waiting = [self.client(s) for _ in range(3)]   # queued in the backlog
        for c in waiting:
            c.send("PING")
        s.wait_log(r"acceptor\[\d+\] accept failed \(Too many open files\); backing off")
        # Let the back-off run several rounds (it doubles to 1 s): the
        # acceptor must neither spin nor die nor log again meanwhile.
        cpu_before = usage([acceptor])[0]             # CPU seconds so far
        time.sleep(3.0)
        spent = usage([acceptor])[0] - cpu_before
        self.assertLess(spent, 0.5, "the acceptor spins while out of descriptors")
        self.assertEqual(len([l for l in s.log_lines if "backing off" in l]), 1, s.log())
        self.assertEqual(s.roles(), before)
        user.expect_nothing_more()                     # the rest goes on
        # Descriptors are back: the queued connections are served.
        resource.prlimit(acceptor, resource.RLIMIT_NOFILE, limits)
        for c in waiting:
            c.expect("PONG")
        s.wait_log(r"acceptor\[\d+\] accepting again")
        waiting[0].login("late")
        user.send("WHO")
        user.expect("USER user", "USER late")
        self.assertEqual(s.roles(), before)

    def test_worker_out_of_descriptors_drops_the_newcomer_only(self):
        s = self.server("--max-per-ip", 0, workers=1)
        before = s.roles()
        worker = before["chat-worker-0"]
        user = self.client(s, "user")
        # No spare descriptor: the kernel cannot install the socket it
        # receives, and drops it in transit.
        limits = self.starve(worker)
        for _ in range(3):
            c = self.client(s)
            c.send("PING")
            self.assertTrue(closed_without_answer(c))
        s.wait_log(r"worker-0\[\d+\] could not receive a connection: out of file descriptors")
        user.expect_nothing_more()
        self.assertEqual(s.roles(), before)
        resource.prlimit(worker, resource.RLIMIT_NOFILE, limits)
        c = self.client(s, "newcomer")
        user.send("WHO")
        user.expect("USER user", "USER newcomer")
        self.assertEqual(s.roles(), before)

    def test_dropped_handoffs_free_their_per_ip_slot(self):
        s = self.server("--max-per-ip", 7, workers=1)
        worker = s.roles()["chat-worker-0"]
        # A user first, who stays: once it is logged in, the worker holds its
        # pipes to the acceptor and the broker. Receiving each of them opens
        # a descriptor for a moment, and a limit taken meanwhile would leave
        # a free one below it once that closes.
        self.client(s, "user")
        limits = self.starve(worker)
        for _ in range(4):
            c = self.client(s)
            c.send("PING")
            self.assertTrue(closed_without_answer(c))
        s.wait_log(r"could not receive a connection")
        resource.prlimit(worker, resource.RLIMIT_NOFILE, limits)
        # Only the user is open from 127.0.0.1: six more connections must
        # fit again (each stays open: the test's cleanup holds it), and a
        # seventh must not.
        for _ in range(6):
            served_once_free(lambda: self.client(s), "ERR too-many-connections")
        self.assertEqual(self.client(s).expect_closed(), ["ERR too-many-connections"])

    def test_acceptor_with_one_descriptor_left_keeps_its_workers(self):
        s = self.server(workers=2)
        acceptor = s.roles()["chat-acceptor"]
        user = self.client(s, "user")
        limits = self.starve(acceptor, spare=1)
        c = self.client(s)
        c.send("PING")
        try:
            c.read_line()             # PONG, or dropped: either may do
        except (AssertionError, OSError):
            pass
        resource.prlimit(acceptor, resource.RLIMIT_NOFILE, limits)
        c = self.client(s)
        c.send("PING")
        c.expect("PONG")
        user.expect_nothing_more()


if __name__ == "__main__":
    unittest.main()
