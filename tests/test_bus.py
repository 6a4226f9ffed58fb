"""The bus records (chatlib.cluster.bus) and entry ids (chatlib.cluster.reader), without Redis."""

import unittest

from support import UnitTestCase

from chatlib.cluster import bus
from chatlib.cluster.reader import entry_number


class TestRecords(UnitTestCase):
    def test_a_turn_round_trips_with_one_origin_per_batch(self):
        r = bus.Records()
        self.assertFalse(r)
        r.from_batch(0, 17)
        r.broadcast(b"MSG a hi\nMSG a there\n")
        r.from_batch(0, 17)                       # same batch: no second header
        r.dm("bob", b"DM a psst\n")
        r.from_batch(1, 5)
        r.broadcast(b"MSG c yo\n")
        self.assertTrue(r)
        self.assertEqual(bus.decode(r.encode()), [
            (bus.ORIGIN, "0", 17), (bus.BROADCAST, b"MSG a hi\nMSG a there\n"),
            (bus.DM, "bob", b"DM a psst\n"),
            (bus.ORIGIN, "1", 5), (bus.BROADCAST, b"MSG c yo\n")])

    def test_a_dm_sent_on_its_own_names_its_own_origin(self):
        r = bus.Records()
        r.from_batch("dm", 99)
        r.dm("x", b"DM y \xe2\x82\xac\n")
        self.assertEqual(bus.decode(r.encode()),
                         [(bus.ORIGIN, "dm", 99), (bus.DM, "x", b"DM y \xe2\x82\xac\n")])

    def test_lines_may_hold_any_bytes(self):
        r = bus.Records()
        r.from_batch(0, 1)
        blob = bytes(range(256)) * 3
        r.broadcast(blob)
        self.assertEqual(bus.decode(r.encode())[1], (bus.BROADCAST, blob))

    def test_malformed_data_is_refused_not_crashed_on(self):
        r = bus.Records()
        r.from_batch(0, 1)
        r.broadcast(b"MSG a hi\n")
        data = r.encode()
        boundary = len(data) - len(b"MSG a hi\n") - 5      # between the two records
        for cut in range(1, len(data)):
            if cut == boundary:
                self.assertEqual(len(bus.decode(data[:cut])), 1)
                continue
            with self.assertRaises(ValueError):
                bus.decode(data[:cut])
        for bad in (b"Z", b"M\x00\x00\x00\x09abc", b"B\x00\x00\x00\x010\x00\x00\x00\x01x"):
            with self.assertRaises(ValueError):
                bus.decode(bad)
        self.assertEqual(bus.decode(b""), [])


class TestEntryNumber(UnitTestCase):
    def test_entry_ids_order_as_numbers(self):
        ids = [b"1-0", b"1-1", b"1-999999", b"2-0", b"1796153603546-0", b"1796153603546-7"]
        numbers = [entry_number(i) for i in ids]
        self.assertEqual(numbers, sorted(numbers))
        self.assertEqual(len(set(numbers)), len(numbers))
        self.assertEqual(entry_number(b"0-0"), 0)


if __name__ == "__main__":
    unittest.main()
