"""Unit tests of bans and mutes (chatlib/moderation.py) and of the files
that keep them (chatlib/statefile.py). The clock is the test's own: the
module never reads one."""

import ipaddress
import json
import os
import pickle
import random
import stat
import unittest
from unittest import mock

from support import UnitTestCase

from chatlib.moderation import (MAX_OP_BYTES, MAX_REASON, Ban, Moderation, Mute, decode_op,
                                encode_op, looks_like_duration, parse_duration, parse_target)
from chatlib.statefile import StateFileError, default_state_dir, load_json, save_json

NOW = 1_700_000_000.0
HOUR = 3600.0


class Durations(UnitTestCase):

    def test_each_unit(self):
        for text, seconds in [("90s", 90), ("30m", 1800), ("12h", 43200), ("7d", 604800),
                              ("2w", 1209600), ("1H", 3600), ("007d", 604800)]:
            self.assertEqual(parse_duration(text), seconds, text)

    def test_bad_ones_are_refused_with_the_forms_to_use(self):
        for text in ["5x", "", "d", "7", "-7d", "1.5h", "7 d", " 7d", "7dd", "٣d", "7ſ"]:
            with self.assertRaisesRegex(ValueError, "use 30s, 30m, 12h, 7d or 2w", msg=text):
                parse_duration(text)

    def test_zero_and_absurd_ones_are_refused(self):
        for text in ["0s", "0w", "000m"]:
            with self.assertRaisesRegex(ValueError, "more than zero"):
                parse_duration(text)
        self.assertEqual(parse_duration("520w"), 520 * 7 * 86400)
        for text in ["3651d", "600w", "99999999999999w"]:
            with self.assertRaisesRegex(ValueError, "at most 10 years"):
                parse_duration(text)
        with self.assertRaises(ValueError):
            parse_duration("9" * 5000 + "s")

    def test_a_duration_is_told_from_the_start_of_a_reason(self):
        self.assertTrue(looks_like_duration("7d"))
        self.assertTrue(looks_like_duration("0s"))          # so that it is refused, not a reason
        for word in ["spamming", "again", "7days", "d7", ""]:
            self.assertFalse(looks_like_duration(word), word)


class Targets(UnitTestCase):

    def test_canonical_forms(self):
        for text, canonical in [
                ("Bob", "bob"), ("x.Y-z_9", "x.y-z_9"), ("-", "-"),
                ("192.0.2.1", "192.0.2.1"),
                ("2001:DB8:0:0:0:0:0:1", "2001:db8::1"),
                ("::ffff:192.0.2.1", "192.0.2.1"), ("::ffff:c000:201", "192.0.2.1"),
                ("10.1.2.3/8", "10.0.0.0/8"), ("10.1.2.3/255.0.0.0", "10.0.0.0/8"),
                ("192.0.2.1/32", "192.0.2.1"), ("2001:db8::1/128", "2001:db8::1"),
                ("2001:db8:1:2::5/32", "2001:db8::/32"),
                ("::ffff:10.1.0.0/104", "10.0.0.0/8"), ("::ffff:0:0/96", "0.0.0.0/0")]:
            self.assertEqual(parse_target(text), canonical, text)

    def test_garbage_is_refused_with_a_clear_message(self):
        for text in ["", "a b", "x" * 33, "bob!", "10.0.0.0/33", "1.2.3.4/x", "fe80::1%eth0",
                     "2001:db8::/129", "::1::2", "a/b", "é", None, 42]:
            with self.assertRaisesRegex(ValueError, "not a name, an address or a CIDR block",
                                        msg=repr(text)):
                parse_target(text)


class Banning(UnitTestCase):

    def setUp(self):
        super().setUp()
        self.moderation = Moderation()

    def test_nothing_set_is_false_and_matches_nothing(self):
        m = self.moderation
        self.assertFalse(m)
        self.assertFalse(m.has_address_bans)
        self.assertIsNone(m.banned_name("bob", NOW))
        self.assertIsNone(m.banned_address("192.0.2.1", NOW))
        self.assertFalse(m.muted("bob", NOW))

    def test_a_name_ban(self):
        m = self.moderation
        ban = m.ban("bob", None, "spam", NOW)
        self.assertEqual(ban, Ban("bob", None, "spam", NOW))
        self.assertTrue(m)
        self.assertFalse(m.has_address_bans)          # names need no check per connection
        self.assertEqual(m.banned_name("bob", NOW + 1e9), ban)
        self.assertIsNone(m.banned_name("alice", NOW))
        self.assertIsNone(m.banned_address("192.0.2.1", NOW))
        self.assertTrue(m.unban("bob"))
        self.assertFalse(m.unban("bob"))
        self.assertIsNone(m.banned_name("bob", NOW))
        self.assertFalse(m)

    def test_targets_are_made_canonical(self):
        m = self.moderation
        self.assertEqual(m.ban("Bob", None, "", NOW).target, "bob")
        self.assertEqual(m.banned_name("bob", NOW).target, "bob")
        self.assertTrue(m.unban("BOB"))

    def test_a_new_ban_replaces_the_old_one(self):
        m = self.moderation
        m.ban("bob", NOW + HOUR, "first", NOW)
        m.ban("bob", None, "second", NOW + 1)
        self.assertEqual(m.bans_listing(NOW + 2), [Ban("bob", None, "second", NOW + 1)])

    def test_an_address_looking_name_is_an_address(self):
        m = self.moderation
        m.ban("1.2.3.4", None, "", NOW)
        self.assertIsNone(m.banned_name("1.2.3.4", NOW))
        self.assertIsNotNone(m.banned_address("1.2.3.4", NOW))

    def test_an_address_ban_covers_its_mapped_form(self):
        m = self.moderation
        ban = m.ban(parse_target("::ffff:192.0.2.1"), None, "", NOW)
        self.assertTrue(m.has_address_bans)
        self.assertEqual(m.banned_address("192.0.2.1", NOW), ban)
        self.assertEqual(m.banned_address("::ffff:192.0.2.1", NOW), ban)
        self.assertIsNone(m.banned_address("192.0.2.2", NOW))
        self.assertIsNone(m.banned_address("::ffff:192.0.2.2", NOW))

    def test_an_ipv6_address_ban(self):
        m = self.moderation
        ban = m.ban(parse_target("2001:db8:0::1"), None, "", NOW)
        self.assertEqual(m.banned_address("2001:db8::1", NOW), ban)
        self.assertEqual(m.banned_address("2001:DB8:0:0::1", NOW), ban)
        self.assertIsNone(m.banned_address("2001:db8::2", NOW))

    def test_network_bans(self):
        m = self.moderation
        v4 = m.ban(parse_target("10.1.2.3/8"), None, "", NOW)
        v6 = m.ban(parse_target("2001:db8::/32"), None, "", NOW)
        self.assertEqual(m.banned_address("10.200.0.1", NOW), v4)
        self.assertEqual(m.banned_address("::ffff:10.200.0.1", NOW), v4)
        self.assertIsNone(m.banned_address("11.0.0.1", NOW))
        self.assertEqual(m.banned_address("2001:db8:ffff::1", NOW), v6)
        self.assertIsNone(m.banned_address("2001:db9::1", NOW))
        self.assertIsNone(m.banned_address("not an address", NOW))
        self.assertTrue(m.unban("10.0.0.0/8"))
        self.assertIsNone(m.banned_address("10.200.0.1", NOW))

    def test_an_expired_ban_in_a_network_does_not_hide_a_live_one(self):
        m = self.moderation
        m.ban(parse_target("10.0.0.0/8"), NOW + 1, "", NOW)
        live = m.ban(parse_target("10.1.0.0/16"), None, "", NOW)
        self.assertEqual(m.banned_address("10.1.0.1", NOW + 2), live)

    def test_mutes(self):
        m = self.moderation
        mute = m.mute("Eve", NOW + HOUR, NOW)
        self.assertEqual(mute, Mute("eve", NOW + HOUR, NOW))
        self.assertTrue(m)
        self.assertFalse(m.has_address_bans)
        self.assertTrue(m.muted("eve", NOW))
        self.assertFalse(m.muted("bob", NOW))
        self.assertIsNone(m.banned_name("eve", NOW))      # muted, not banned
        self.assertTrue(m.unmute("eve"))
        self.assertFalse(m.unmute("eve"))
        self.assertFalse(m.muted("eve", NOW))
        with self.assertRaisesRegex(ValueError, "bad name"):
            m.mute("10.0.0.0/8", None, NOW)

    def test_a_reason_is_one_clean_line(self):
        ban = self.moderation.ban("bob", None, " spam\tand\nmore\x1b[31m\u202e  ", NOW)
        self.assertEqual(ban.reason, "spam and more [31m")
        long = self.moderation.ban("bob", None, "x" * 1000, NOW)
        self.assertEqual(len(long.reason), MAX_REASON)


class Expiry(UnitTestCase):

    def setUp(self):
        super().setUp()
        self.moderation = m = Moderation()
        self.ban = m.ban("bob", NOW + HOUR, "", NOW)
        m.ban(parse_target("192.0.2.1"), NOW + 2 * HOUR, "", NOW)
        m.ban(parse_target("10.0.0.0/8"), NOW + 3 * HOUR, "", NOW)
        m.mute("eve", NOW + 30, NOW)
        m.ban("mallory", None, "for ever", NOW)

    def test_entries_stop_matching_when_they_expire(self):
        m = self.moderation
        self.assertEqual(m.banned_name("bob", NOW + HOUR - 0.001), self.ban)
        self.assertIsNone(m.banned_name("bob", NOW + HOUR))
        self.assertIsNotNone(m.banned_address("192.0.2.1", NOW + HOUR))
        self.assertIsNone(m.banned_address("192.0.2.1", NOW + 2 * HOUR))
        self.assertIsNotNone(m.banned_address("10.0.0.1", NOW + 2 * HOUR))
        self.assertIsNone(m.banned_address("10.0.0.1", NOW + 3 * HOUR))
        self.assertTrue(m.muted("eve", NOW + 29))
        self.assertFalse(m.muted("eve", NOW + 30))
        self.assertIsNotNone(m.banned_name("mallory", NOW + 1e9))

    def test_listings_show_live_entries_oldest_first(self):
        m = self.moderation
        m.ban("alice", None, "", NOW - 10)
        self.assertEqual([b.target for b in m.bans_listing(NOW + 1.5 * HOUR)],
                         ["alice", "10.0.0.0/8", "192.0.2.1", "mallory"])
        self.assertEqual(m.mutes_listing(NOW), [Mute("eve", NOW + 30, NOW)])
        self.assertEqual(m.mutes_listing(NOW + 30), [])

    def test_prune_drops_what_expired_and_says_so(self):
        m = self.moderation
        self.assertFalse(m.prune(NOW))
        self.assertTrue(m.prune(NOW + HOUR))
        self.assertFalse(m.prune(NOW + HOUR))
        self.assertEqual(len(m.ops()), 3)
        self.assertTrue(m.prune(NOW + 1e9))
        self.assertEqual(m.ops(), [("ban", "mallory", None, "for ever", NOW)])
        self.assertFalse(m.has_address_bans)


class Operations(UnitTestCase):

    OPS = [("ban", "bob", None, "spam", NOW), ("ban", "10.0.0.0/8", NOW + HOUR, "", NOW + 0.25),
           ("ban", "2001:db8::1", None, "ünïcödé ✓", NOW), ("unban", "bob"),
           ("mute", "eve", NOW + 0.1, NOW), ("mute", "eve", None, NOW), ("unmute", "eve")]

    def test_encode_decode_round_trip(self):
        for op in self.OPS:
            data = encode_op(op)
            self.assertNotIn(b"\n", data)
            self.assertEqual(decode_op(data), op)

    def test_an_encoded_reason_is_one_field(self):
        data = encode_op(("ban", "bob", None, "a\tb\nc" + "é" * 1000, NOW))
        self.assertLessEqual(len(data), MAX_OP_BYTES)
        op = decode_op(data)
        self.assertEqual(op[3], "a b c" + "é" * (MAX_REASON - 5))

    def test_garbage_is_refused(self):
        for data in [b"", b"ban", b"ban\tbob\t-\tspam", b"ban\tbob\t-\tspam\t1\textra",
                     b"ban\tbob\tsoon\t\t1", b"ban\tbob\t-\t\tnan", b"ban\tbob\t-\t\t-1",
                     b"ban\tbob\t-\t\t-", b"ban\tbad target\t-\t\t1", b"unban\t",
                     b"mute\t1.2.3.4/8\t-\t1", b"mute\teve\tinf\t1", b"exec\trm -rf /",
                     b"\xff\xfe", b"unmute\t" + b"a" * MAX_OP_BYTES,
                     pickle.dumps(("ban", "bob", None, "", NOW))]:
            with self.assertRaises(ValueError, msg=data):
                decode_op(data)

    def test_apply_says_whether_anything_changed(self):
        m = Moderation()
        self.assertEqual([m.apply(op) for op in self.OPS], [True] * len(self.OPS))
        self.assertTrue(m.apply(self.OPS[0]))
        self.assertFalse(m.apply(self.OPS[0]))           # the same op again: no change
        self.assertFalse(m.apply(("unban", "alice")))
        self.assertFalse(m.apply(("unmute", "alice")))
        for op in [("ban", "bob"), ("ban", "bob", None, "", "yesterday"), ("kick", "bob"),
                   (), "ban"]:
            with self.assertRaises(ValueError, msg=op):
                m.apply(op)

    def test_ops_rebuild_the_state(self):
        m = Moderation()
        for op in self.OPS:
            m.apply(op)
        copy = Moderation()
        for op in m.ops():
            self.assertTrue(copy.apply(decode_op(encode_op(op))))
        self.assertEqual(copy.to_json(), m.to_json())
        self.assertEqual(Moderation(m.ops()).to_json(), m.to_json())
        self.assertEqual(m.banned_address("10.1.1.1", NOW).op, self.OPS[1])


def sample():
    m = Moderation()
    m.ban("bob", None, "spam", NOW)
    m.ban(parse_target("::ffff:192.0.2.7"), NOW + HOUR, "", NOW + 1)
    m.ban(parse_target("2001:db8::/48"), None, "bots", NOW + 2)
    m.mute("eve", NOW + 60, NOW + 3)
    return m


class WholeState(UnitTestCase):

    def test_json_round_trip(self):
        m = sample()
        obj = json.loads(json.dumps(m.to_json()))
        self.assertEqual(Moderation.from_json(obj).to_json(), m.to_json())
        self.assertEqual(obj["bans"][1], {"target": "192.0.2.7", "expires": NOW + HOUR,
                                          "reason": "", "since": NOW + 1})

    def test_a_bad_file_is_refused_saying_where(self):
        self.assert_damage_refused(Moderation.from_json, sample().to_json(), [
                (lambda o: o["bans"][2].update(target="10.0.0.0/99"),
                 r"bans\[2\]: bad target '10.0.0.0/99'"),
                (lambda o: o["bans"][0].pop("since"), r"bans\[0\]: bad since None"),
                (lambda o: o["mutes"][0].update(expires="soon"), r"mutes\[0\]: bad expiry 'soon'"),
                (lambda o: o["mutes"].append([]), r"mutes\[1\]: not an object"),
                (lambda o: o.update(bans={}), r"bans: not a list"),
                (lambda o: o.update(version=2), r"version 2")])

    def test_a_hand_written_entry_is_made_canonical(self):
        m = Moderation.from_json({"version": 1, "bans": [{"target": "Bob", "since": 1}]})
        self.assertEqual(m.bans_listing(2), [Ban("bob", None, "", 1.0)])

    def test_pickling_keeps_the_state_and_is_small(self):
        m = sample()
        data = pickle.dumps(m)
        self.assertNotIn(b"ipaddress", data)
        copy = pickle.loads(data)
        self.assertEqual(copy.to_json(), m.to_json())
        self.assertIsNotNone(copy.banned_address("2001:db8:0:1::5", NOW))
        self.assertEqual(pickle.loads(pickle.dumps(Moderation())).ops(), [])
        self.assertFalse(pickle.loads(pickle.dumps(Moderation())))


class AddressMatching(UnitTestCase):
    """banned_address's shortcuts against the plain rule: the client's
    address, unmapped, is a banned one or in a banned network."""

    def test_random_bans_and_clients(self):
        rng = random.Random(7)
        v4 = ["10.0.%d.%d" % (rng.randrange(4), rng.randrange(4)) for _ in range(6)]
        v6 = ["2001:db8::%x:%x" % (rng.randrange(4), rng.randrange(4)) for _ in range(6)]
        clients = v4 + v6 + ["::ffff:" + ip for ip in v4]
        for _ in range(200):
            m = Moderation()
            for _ in range(rng.randrange(4)):
                ip = rng.choice(clients)
                top = 128 if ":" in ip else 32
                prefix = rng.choice(["", "/%d" % rng.randrange(top - 16, top + 1)])
                expires = rng.choice([None, NOW - 1, NOW + 1])
                m.ban(parse_target(ip + prefix), expires, "", NOW - 10)
            for client in clients:
                self.assertEqual(m.banned_address(client, NOW) is not None,
                                 self.plainly_banned(m, client), (client, m.ops()))

    @staticmethod
    def plainly_banned(m, client):
        address = ipaddress.ip_address(client)
        address = getattr(address, "ipv4_mapped", None) or address
        return any(address in ipaddress.ip_network(ban.target) for ban in m.bans_listing(NOW))


class StateFiles(UnitTestCase):

    def setUp(self):
        super().setUp()
        self.dir = os.path.join(self.tmpdir("state"), "chat")
        self.path = os.path.join(self.dir, "moderation.json")

    def test_save_and_load_round_trip(self):
        self.assertIsNone(load_json(self.path))
        save_json(self.path, sample().to_json())
        self.assertEqual(Moderation.from_json(load_json(self.path)).to_json(),
                         sample().to_json())
        save_json(self.path, {"version": 1, "bans": [], "mutes": []})
        self.assertEqual(Moderation.from_json(load_json(self.path)).ops(), [])
        self.assertEqual(os.listdir(self.dir), ["moderation.json"])     # no temporary left

    def test_the_directory_and_the_file_are_private(self):
        save_json(self.path, {})
        self.assertEqual(stat.S_IMODE(os.stat(self.dir).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_the_temporary_file_is_private_from_its_creation(self):
        real_open = os.open
        modes = []

        def spying_open(path, flags, mode=0o777, **kwargs):
            if path.endswith(".tmp"):
                modes.append((flags & (os.O_CREAT | os.O_EXCL), mode))
            return real_open(path, flags, mode, **kwargs)
        with mock.patch("os.open", spying_open):
            save_json(self.path, {})
        self.assertEqual(modes, [(os.O_CREAT | os.O_EXCL, 0o600)])

    def test_a_temporary_file_left_by_a_crash_is_ignored(self):
        save_json(self.path, {"kept": True})
        with open(os.path.join(self.dir, ".moderation.json.0123456789ab.tmp"), "w") as f:
            f.write('{"half": ')
        self.assertEqual(load_json(self.path), {"kept": True})
        save_json(self.path, {"kept": False})
        self.assertEqual(load_json(self.path), {"kept": False})

    def test_a_failed_save_keeps_the_previous_content(self):
        save_json(self.path, {"kept": True})
        with self.assertRaises(TypeError):
            save_json(self.path, {"kept": object()})
        with self.assertRaises(ValueError):
            save_json(self.path, {"kept": float("nan")})
        with mock.patch("os.replace", side_effect=OSError(28, "No space left on device")):
            with self.assertRaises(OSError):
                save_json(self.path, {"kept": False})
        self.assertEqual(load_json(self.path), {"kept": True})
        self.assertEqual(os.listdir(self.dir), ["moderation.json"])     # its temporary removed

    def test_garbage_is_refused_naming_the_file_and_the_line(self):
        os.makedirs(self.dir)
        with open(self.path, "w") as f:
            f.write('{"version": 1,\n "bans": [}\n')
        with self.assertRaises(StateFileError) as caught:
            load_json(self.path)
        self.assertIsInstance(caught.exception, ValueError)
        self.assertRegex(str(caught.exception), "^%s: not JSON, at line 2 " % self.path)
        with open(self.path, "wb") as f:
            f.write(b"\xff\xfe")
        with self.assertRaisesRegex(StateFileError, "^%s: not UTF-8" % self.path):
            load_json(self.path)

    def test_an_unreadable_file_is_refused_naming_the_file(self):
        os.makedirs(self.path)
        with self.assertRaisesRegex(StateFileError, "^%s: unreadable: is a directory" % self.path):
            load_json(self.path)

    @unittest.skipIf(os.geteuid() == 0, "root reads any file")
    def test_a_file_without_permission_is_refused(self):
        save_json(self.path, {})
        os.chmod(self.path, 0)
        with self.assertRaisesRegex(StateFileError,
                                    "^%s: unreadable: permission denied" % self.path):
            load_json(self.path)


class DefaultStateDir(UnitTestCase):

    def where(self, **environ):
        with mock.patch.dict(os.environ, environ):
            for name in ("STATE_DIRECTORY", "XDG_STATE_HOME"):
                if name not in environ:
                    os.environ.pop(name, None)
            return default_state_dir(4000)

    def test_systemd_first(self):
        self.assertEqual(self.where(STATE_DIRECTORY="/var/lib/chat", XDG_STATE_HOME="/x"),
                         "/var/lib/chat")
        self.assertEqual(self.where(STATE_DIRECTORY="/var/lib/a:/var/lib/b"), "/var/lib/a")

    def test_then_xdg_then_home_with_the_port(self):
        self.assertEqual(self.where(XDG_STATE_HOME="/st"), "/st/chat-server/4000")
        home = os.path.expanduser("~")
        self.assertEqual(self.where(), os.path.join(home, ".local/state/chat-server/4000"))
        self.assertEqual(self.where(XDG_STATE_HOME="relative", STATE_DIRECTORY=""),
                         os.path.join(home, ".local/state/chat-server/4000"))


if __name__ == "__main__":
    unittest.main()
