"""Unit tests of the notes vocabulary (chatlib/notes.py): what a worker
encodes, the acceptor decodes, whatever the reads cut it into."""

import unittest

from support import UnitTestCase

from chatlib.notes import GONE, LOST, OPEN, NoteReader, note_gone, note_lost, note_open


class Notes(UnitTestCase):

    def test_round_trip_in_one_read(self):
        data = note_open("10.0.0.1") + note_gone("::1") + note_lost(41)
        self.assertEqual(NoteReader().feed(data),
                         [(OPEN, "10.0.0.1"), (GONE, "::1"), (LOST, 41)])

    def test_cut_anywhere(self):
        data = note_gone("192.168.1.20") + note_lost(7) + note_open("?")
        expected = [(GONE, "192.168.1.20"), (LOST, 7), (OPEN, "?")]
        for cut in range(len(data) + 1):
            reader = NoteReader()
            self.assertEqual(reader.feed(data[:cut]) + reader.feed(data[cut:]), expected, cut)
        reader = NoteReader()
        self.assertEqual([n for b in data for n in reader.feed(bytes([b]))], expected)

    def test_unknown_lines_are_skipped(self):
        self.assertEqual(NoteReader().feed(b"?what\n\n!x\n-1.2.3.4\n"), [(GONE, "1.2.3.4")])


if __name__ == "__main__":
    unittest.main()
