"""Unit tests of accounts (chatlib/accounts.py): passwords and their
hashes, the state and its operations, the throttle of guesses; and of the
threads that hash off the event loop (chatlib/hasher.py). Hashes use a
cheap cost (CHEAP), but for one test at DEFAULT_COST; the clock is the
test's own."""

import base64
import json
import os
import pickle
import pickletools
import selectors
import sys
import threading
import time
import unittest
from unittest import mock

from support import UnitTestCase

from chatlib import accounts as accounts_module
from chatlib.accounts import (DEFAULT_COST, MAX_FAILURES, MAX_OP_BYTES, MAX_PASSWORD_BYTES,
                              MIN_PASSWORD, WINDOW, Account, Accounts, ScryptCost, Throttle,
                              address_group, check_new_password, decode_op, encode_op,
                              hash_password, verify_password)
from chatlib.hasher import Hasher

NOW = 1_700_000_000.0
CHEAP = ScryptCost(n=16, r=1, p=1, dklen=32)
HASH = hash_password("correct horse", cost=CHEAP)


def stored_form(n, r, p, salt=b"s" * 16, digest=b"h" * 32):
    """A stored hash of this cost, made without hashing (its hash is no one's)."""
    return "scrypt$n=%d,r=%d,p=%d$%s$%s" % (n, r, p, base64.b64encode(salt).decode(),
                                            base64.b64encode(digest).decode())


def not_canonical(salt):
    """Base64 ``salt`` (16 bytes) with bits set that decoding ignores:
    another text for the same bytes."""
    last = salt[-3]                         # "A", "Q", "g" or "w": 2 bits, then 4 zeros
    return salt[:-3] + chr(ord(last) + 1) + "=="


class Passwords(UnitTestCase):

    def test_eight_characters_at_least(self):
        self.assertEqual(MIN_PASSWORD, 8)
        for weak in ["", "1234567", "ééééééé", "       "]:
            with self.assertRaisesRegex(ValueError, "^weak-password$", msg=weak):
                check_new_password(weak)
        for strong in ["12345678", "éééééééé", "密码密码密码密码", "correct horse"]:
            check_new_password(strong)

    def test_characters_are_counted_after_normalisation(self):
        # Seven "é" typed as "e" and a combining accent: 14 code points, 7 characters.
        with self.assertRaisesRegex(ValueError, "weak-password"):
            check_new_password("e\u0301" * 7)

    def test_too_long_a_password_is_refused(self):
        check_new_password("x" * MAX_PASSWORD_BYTES)
        for long in ["x" * (MAX_PASSWORD_BYTES + 1), "é" * (MAX_PASSWORD_BYTES // 2 + 1)]:
            with self.assertRaisesRegex(ValueError, "^password-too-long$"):
                check_new_password(long)

    def test_round_trip(self):
        self.assertRegex(HASH, r"^scrypt\$n=16,r=1,p=1\$[A-Za-z0-9+/=]{24}\$[A-Za-z0-9+/=]{44}$")
        self.assertTrue(verify_password("correct horse", HASH))
        for wrong in ["correct horse ", "Correct horse", "", "correct", "x" * 5000]:
            self.assertFalse(verify_password(wrong, HASH), wrong)

    def test_unicode_and_its_two_forms(self):
        stored = hash_password("caf\u00e9 au lait", cost=CHEAP)
        self.assertTrue(verify_password("cafe\u0301 au lait", stored))
        self.assertFalse(verify_password("cafe au lait", stored))

    def test_a_salt_of_its_own(self):
        other = hash_password("correct horse", cost=CHEAP)
        self.assertNotEqual(other, HASH)
        self.assertTrue(verify_password("correct horse", other))
        salt = os.urandom(16)
        self.assertEqual(hash_password("pw", salt, CHEAP), hash_password("pw", salt, CHEAP))

    def test_a_bad_salt_or_cost_is_refused(self):
        for salt, cost in [(b"short", CHEAP), ("text" * 8, CHEAP), (None, (15, 1, 1, 32)),
                           (None, (2 ** 20, 8, 1, 32)), (None, (16, 1, 1, 8))]:
            with self.assertRaises(ValueError, msg=(salt, cost)):
                hash_password("correct horse", salt, cost)

    def test_malformed_stored_hashes_fail_without_an_exception(self):
        good = HASH.split("$")
        for stored in [None, b"scrypt", 42, "", "scrypt", HASH + "$", HASH[:-1], HASH + "=",
                       "bcrypt$" + "$".join(good[1:]), HASH.replace("n=16", "n=016"),
                       HASH.replace("n=16", "n=15"), HASH.replace("n=16", "n=1"),
                       HASH.replace("n=16", "n=0"), HASH.replace("n=16", "n=-16"),
                       HASH.replace("r=1,p=1", "p=1,r=1"), HASH.replace(",p=1", ",p=1,x=1"),
                       "$".join(good[:3] + ["!!!!"]), "$".join(good[:2] + ["", good[3]]),
                       "$".join(good[:2] + [not_canonical(good[2]), good[3]]),
                       stored_form(16, 1, 1, salt=b"s" * 8),
                       stored_form(16, 1, 1, digest=b"h" * 8),
                       HASH.replace("$", "\t"), HASH + "\n", " " + HASH]:
            self.assertFalse(verify_password("correct horse", stored), stored)

    def test_tampered_costs_fail_before_any_hashing(self):
        with mock.patch.object(accounts_module.hashlib, "scrypt") as scrypt:
            for n, r, p in [(2 ** 30, 8, 1), (2 ** 20, 8, 1), (2 ** 17, 8, 1), (2 ** 14, 8, 5),
                            (2 ** 14, 99999, 1), (2 ** 14, 8, 99999), (2 ** 33, 1, 1)]:
                self.assertFalse(verify_password("pw", stored_form(n, r, p)), (n, r, p))
            scrypt.assert_not_called()

    def test_a_cost_openssl_refuses_fails_quietly(self):
        # Within bounds, but scrypt wants n < 2 ** (16 r): OpenSSL's error is a False.
        self.assertFalse(verify_password("pw", stored_form(2 ** 16, 1, 1)))

    def test_no_password_in_an_error(self):
        for call in [lambda: check_new_password("secret1"),
                     lambda: hash_password("secret12", b"", CHEAP),
                     lambda: decode_op(b"account\tbob\tbob\tsecret12\t1.0")]:
            with self.assertRaises(ValueError) as caught:
                call()
            self.assertNotIn("secret", str(caught.exception))


def account_op(name, created=NOW, stored=HASH):
    return ("account", name.lower(), name, stored, created)


class Operations(UnitTestCase):

    OPS = [account_op("Bob"), account_op("alice", NOW + 1), ("seen", "bob", NOW + 5),
           ("seen", "bob", NOW + 9.25),
           account_op("BOB", NOW, hash_password("new one!", cost=CHEAP)),
           ("unregister", "alice")]

    def test_apply_says_whether_anything_changed(self):
        a = Accounts()
        self.assertEqual([a.apply(op) for op in self.OPS], [True] * len(self.OPS))
        self.assertFalse(a.apply(self.OPS[4]))              # the same op again: no change
        self.assertFalse(a.apply(("unregister", "alice")))
        self.assertFalse(a.apply(("seen", "alice", NOW + 10)))   # gone: nothing to see
        self.assertFalse(a.apply(("seen", "bob", NOW + 5)))      # never back in time
        bob = a.get("bob")
        self.assertEqual(bob, Account("bob", "BOB", self.OPS[4][3], NOW, NOW + 9.25))
        self.assertEqual((len(a), "bob" in a, "alice" in a, a.get("alice")),
                         (1, True, False, None))

    def test_a_new_hash_keeps_the_last_login(self):
        a = Accounts(self.OPS[:4])
        a.apply(a.get("bob")._replace(password=stored_form(16, 1, 1)).op)
        self.assertEqual(a.get("bob").last_login, NOW + 9.25)
        self.assertEqual(a.get("bob").password, stored_form(16, 1, 1))

    def test_bad_operations_are_refused(self):
        a = Accounts()
        for op in [("account", "bob", "Bob", HASH), ("account", "Bob", "Bob", HASH, NOW),
                   ("account", "bob", "alice", HASH, NOW), ("account", "bo b", "bo b", HASH, NOW),
                   ("account", "bob", "bob", "hunter22", NOW), ("account", "bob", "bob", HASH, -1),
                   ("account", "bob", "bob", HASH, "yesterday"), ("seen", "bob", float("nan")),
                   ("seen", "bob", True), ("unregister", "é"), ("delete", "bob"), (), "seen"]:
            with self.assertRaises(ValueError, msg=op):
                a.apply(op)
        self.assertFalse(a)

    def test_encode_decode_round_trip(self):
        for op in self.OPS:
            data = encode_op(op)
            self.assertNotIn(b"\n", data)
            self.assertLessEqual(len(data), MAX_OP_BYTES)
            self.assertEqual(decode_op(data), op)
        longest = account_op("x" * 32, stored=stored_form(2 ** 16, 8, 1, b"s" * 64, b"h" * 64))
        self.assertLessEqual(len(encode_op(longest)), MAX_OP_BYTES)

    def test_garbage_is_refused(self):
        op = encode_op(account_op("bob"))
        for data in [b"", b"account", op + b"\textra", op.replace(b"\t1700000000.0", b""),
                     op.replace(b"1700000000.0", b"soon"), op.replace(b"1700000000.0", b"nan"),
                     op.replace(b"1700000000.0", b"-1"), op.replace(b"1700000000.0", b"inf"),
                     op.replace(b"\tbob\t", b"\tBob\t", 1), op.replace(b"bob\tbob", b"bob\teve"),
                     op.replace(b"scrypt", b"bcrypt"), op.replace(b"n=16,", b"n=1073741824,"),
                     b"account\tbob\tbob\thunter22\t1.0", b"seen\tbob\t-", b"seen\tbob",
                     b"unregister\t", b"unregister\tbad name", b"exec\trm -rf /",
                     b"\xff\xfe", b"unregister\t" + b"a" * MAX_OP_BYTES,
                     pickle.dumps(account_op("bob"))]:
            with self.assertRaises(ValueError, msg=data):
                decode_op(data)

    def test_ops_rebuild_the_state(self):
        a = Accounts(self.OPS)
        a.apply(account_op("carol", NOW - 1))
        copy = Accounts()
        for op in a.ops():
            self.assertTrue(copy.apply(decode_op(encode_op(op))))
        self.assertEqual(copy.to_json(), a.to_json())
        self.assertEqual(Accounts(a.ops()).to_json(), a.to_json())
        self.assertEqual([x.key for x in a.listing()], ["carol", "bob"])     # oldest first


def sample():
    return Accounts([account_op("Bob"), account_op("alice", NOW + 1), ("seen", "bob", NOW + 5)])


class WholeState(UnitTestCase):

    def test_json_round_trip(self):
        a = sample()
        obj = json.loads(json.dumps(a.to_json()))
        self.assertEqual(Accounts.from_json(obj).to_json(), a.to_json())
        self.assertEqual(obj["accounts"][0], {"key": "bob", "name": "Bob", "password": HASH,
                                              "created": NOW, "last_login": NOW + 5})
        self.assertEqual(Accounts.from_json({"version": 1}).ops(), [])

    def test_a_bad_file_is_refused_saying_where(self):
        self.assert_damage_refused(Accounts.from_json, sample().to_json(), [
                (lambda o: o["accounts"][1].update(name="al ice"), r"^accounts\[1\]: bad name"),
                (lambda o: o["accounts"][1].update(key="Alice"), r"^accounts\[1\]: bad key"),
                (lambda o: o["accounts"][0].update(key="eve"),
                 r"^accounts\[0\]: key 'eve' is not"),
                (lambda o: o["accounts"][0].pop("created"), r"^accounts\[0\]: bad created None"),
                (lambda o: o["accounts"][0].update(last_login="now"),
                 r"^accounts\[0\]: bad last_login 'now'"),
                (lambda o: o["accounts"][1].update(password="hunter22"),
                 r"^accounts\[1\]: bad password hash$"),
                (lambda o: o["accounts"][1].update(key=["bob"]), r"^accounts\[1\]: bad name"),
                (lambda o: o["accounts"].append(o["accounts"][0]),
                 r"^accounts\[2\]: a second account 'bob'"),
                (lambda o: o["accounts"].append("bob"), r"^accounts\[2\]: not an object"),
                (lambda o: o.update(accounts={}), r"^accounts: not a list"),
                (lambda o: o.update(version=2), r"^version 2")])

    def test_pickling_keeps_the_state_and_is_small(self):
        a = sample()
        data = pickle.dumps(a)
        strings = {arg for opcode, arg, _ in pickletools.genops(data) if isinstance(arg, str)}
        self.assertNotIn("Account", strings)        # ops, plain tuples: no record class
        self.assertLess(len(data), 500)
        self.assertEqual(pickle.loads(data).to_json(), a.to_json())
        self.assertFalse(pickle.loads(pickle.dumps(Accounts())))


class Throttling(UnitTestCase):

    def test_an_address_may_fail_a_few_times_a_window(self):
        t = Throttle()
        for i in range(MAX_FAILURES):
            self.assertTrue(t.allowed("192.0.2.1", "user%d" % i, NOW + i))
            t.failed("192.0.2.1", "user%d" % i, NOW + i)
        self.assertFalse(t.allowed("192.0.2.1", "someone", NOW + 10))
        self.assertEqual(t.left("192.0.2.1", "someone", NOW + 10), (0, MAX_FAILURES))
        self.assertTrue(t.allowed("192.0.2.2", "someone", NOW + 10))
        self.assertFalse(t.allowed("::ffff:192.0.2.1", "someone", NOW + 10))   # the same client
        self.assertFalse(t.allowed("192.0.2.1", "someone", NOW + WINDOW - 0.001))
        self.assertTrue(t.allowed("192.0.2.1", "someone", NOW + WINDOW))       # the first expired
        t.failed("192.0.2.1", "someone", NOW + WINDOW)
        self.assertFalse(t.allowed("192.0.2.1", "someone", NOW + WINDOW))      # five in the window
        self.assertTrue(t.allowed("192.0.2.1", "someone", NOW + WINDOW + 1))

    def test_a_name_may_fail_a_few_times_a_window_from_anywhere(self):
        t = Throttle()
        for i in range(MAX_FAILURES):
            t.failed("198.51.100.%d" % i, "bob", NOW)
        self.assertFalse(t.allowed("203.0.113.9", "bob", NOW + 1))
        self.assertTrue(t.allowed("203.0.113.9", "alice", NOW + 1))
        self.assertTrue(t.allowed("203.0.113.9", "bob", NOW + WINDOW))

    def test_success_clears_the_name_not_the_address(self):
        t = Throttle()
        for i in range(MAX_FAILURES):
            t.failed("192.0.2.1", "bob", NOW)
        t.succeeded("192.0.2.1", "bob")
        self.assertTrue(t.allowed("192.0.2.2", "bob", NOW))
        self.assertFalse(t.allowed("192.0.2.1", "mallory", NOW))

    def test_ipv6_clients_count_by_their_64(self):
        t = Throttle()
        for i in range(MAX_FAILURES):
            t.failed("2001:db8:1:2::%x" % i, "user%d" % i, NOW)
        for same in ["2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:DB8:1:2::99"]:
            self.assertFalse(t.allowed(same, "x", NOW), same)
        self.assertTrue(t.allowed("2001:db8:1:3::1", "x", NOW))
        self.assertEqual(address_group("2001:db8:1:2:3:4:5:6"), "2001:db8:1:2::/64")
        self.assertEqual(address_group("::ffff:192.0.2.1"), "192.0.2.1")
        self.assertEqual(address_group("192.0.2.1"), "192.0.2.1")
        self.assertEqual(address_group("fe80::1%eth0"), "fe80::/64")
        self.assertEqual(address_group("not:an address"), "not:an address")
        self.assertEqual(address_group(""), "")

    def test_memory_is_bounded_oldest_first(self):
        t = Throttle(max_tracked=100)
        for i in range(1000):
            t.failed("10.0.%d.%d" % (i // 256, i % 256), "user%d" % i, NOW + i / 1000)
        self.assertEqual(len(t), 200)
        self.assertEqual(len(t._addresses), 100)
        for i in range(MAX_FAILURES):
            t.failed("10.9.9.9", "bob", NOW + 2)
        self.assertFalse(t.allowed("10.9.9.9", "x", NOW + 2))
        for i in range(99):
            t.failed("10.1.0.%d" % i, "user%d" % i, NOW + 3)
        self.assertFalse(t.allowed("10.9.9.9", "x", NOW + 3))    # failed recently: kept
        t.failed("10.1.1.1", "z", NOW + 3)
        self.assertTrue(t.allowed("10.9.9.9", "x", NOW + 3))     # now the oldest: dropped

    def test_expired_entries_go_as_failures_come(self):
        t = Throttle()
        for i in range(50):
            t.failed("10.0.0.%d" % i, "user%d" % i, NOW)
        t.failed("10.0.1.1", "bob", NOW + WINDOW + 1)
        self.assertEqual(len(t), 2)


class Hashing(UnitTestCase):

    def hasher(self, **kwargs):
        h = Hasher(**kwargs)
        self.addCleanup(h.close)
        return h

    def collect(self, hasher, count, within=10):
        """``count`` results, waiting for them on a selector as a loop would."""
        got = []
        with selectors.DefaultSelector() as selector:
            selector.register(hasher, selectors.EVENT_READ)
            deadline = time.monotonic() + within
            while len(got) < count:
                self.assertTrue(selector.select(deadline - time.monotonic()), "no wake-up")
                got += hasher.results()
        return got

    def test_results_come_back_through_the_socket(self):
        h = self.hasher()
        self.assertEqual(h.results(), [])
        self.assertTrue(h.submit(("login", 1), verify_password, "correct horse", HASH))
        self.assertTrue(h.submit(("login", 2), verify_password, "wrong horse", HASH))
        self.assertTrue(h.submit("register", hash_password, "new one!", None, CHEAP))
        self.assertEqual(h.pending, 3)
        got = dict(self.collect(h, 3))
        self.assertEqual((got[("login", 1)], got[("login", 2)]), (True, False))
        self.assertTrue(verify_password("new one!", got["register"]))
        self.assertEqual((h.pending, h.results()), (0, []))

    def test_no_thread_until_the_first_job(self):
        h = self.hasher(max_in_flight=2)
        self.assertEqual(self.hasher_threads(), [])
        h.submit(1, int, "1")
        self.assertEqual(self.collect(h, 1), [(1, 1)])
        self.assertEqual(len(self.hasher_threads()), 2)

    @staticmethod
    def hasher_threads():
        return [t for t in threading.enumerate() if t.name.startswith("hasher-")]

    def test_a_full_queue_refuses(self):
        h = self.hasher(max_in_flight=1, max_queued=2)
        started, release = threading.Event(), threading.Event()

        def busy():
            started.set()
            return release.wait(10)
        self.assertTrue(h.submit("busy", busy))
        self.assertTrue(started.wait(10))
        self.assertTrue(h.submit(1, int, "1"))
        self.assertTrue(h.submit(2, int, "2"))
        self.assertFalse(h.submit(3, int, "3"))
        self.assertEqual(h.pending, 3)
        release.set()
        self.assertEqual(self.collect(h, 3), [("busy", True), (1, 1), (2, 2)])
        self.assertTrue(h.submit(3, int, "3"))

    def test_an_exception_is_a_value(self):
        h = self.hasher()
        h.submit("bad", int, "not a number")
        h.submit("good", int, "7")
        (job, error), after = self.collect(h, 2)
        self.assertEqual(job, "bad")
        self.assertIsInstance(error, ValueError)
        self.assertIsNone(error.__traceback__)      # its frames would keep the arguments
        self.assertEqual(after, ("good", 7))

    def test_close_joins_the_threads(self):
        h = Hasher(max_in_flight=2)
        h.submit(1, int, "1")
        self.collect(h, 1)
        h.submit(2, time.sleep, 0.05)
        h.close()
        self.assertEqual(self.hasher_threads(), [])
        with self.assertRaises(RuntimeError):
            h.submit(3, int, "3")

    @unittest.skipUnless(sys.platform.startswith("linux"), "a thread's own niceness: Linux")
    def test_workers_run_at_the_lowest_priority(self):
        def niceness():
            return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        own = niceness()
        for idle, wanted in [(True, 19), (False, own)]:
            h = self.hasher(idle_priority=idle)
            h.submit("nice", niceness)
            self.assertEqual(self.collect(h, 1), [("nice", wanted)])
        self.assertEqual(niceness(), own)       # the loop's thread is left as it was

    def test_a_hash_does_not_block_the_loop(self):
        # The one hash at DEFAULT_COST: tens of milliseconds, in which the
        # loop's thread must run on (hashlib.scrypt lets go of the GIL). If
        # it did not, no iteration would fall within the hash.
        def timed():
            start = time.perf_counter()
            stored = hash_password("correct horse", cost=DEFAULT_COST)
            return start, time.perf_counter(), stored
        h = self.hasher()
        ticks = []
        h.submit("default", timed)
        with selectors.DefaultSelector() as selector:
            selector.register(h, selectors.EVENT_READ)
            while not selector.select(0):
                ticks.append(time.perf_counter())
        [(_, (start, end, stored))] = h.results()
        during = sum(start < tick < end for tick in ticks)
        self.assertGreater(during, 100, "%d loop turns in a hash of %.0f ms"
                           % (during, (end - start) * 1000))
        self.assertRegex(stored, r"^scrypt\$n=16384,r=8,p=1\$")


if __name__ == "__main__":
    unittest.main()
