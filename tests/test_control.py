"""The control socket's command table (chatlib/control/commands.py)."""

import unittest

from support import UnitTestCase

from chatlib.control import commands


class Commands(UnitTestCase):

    def test_split(self):
        self.assertEqual(commands.split("  KICK  bob  spamming  again "),
                         ("kick", "bob  spamming  again"))
        self.assertEqual(commands.split("users"), ("users", ""))
        self.assertEqual(commands.split(""), ("", ""))

    def test_the_table(self):
        for name in ("help", "users", "kick", "ban", "unban", "bans", "mute", "unmute",
                     "announce", "stats", "metrics", "reload"):
            self.assertTrue(commands.known(name), name)
        self.assertFalse(commands.known("nope"))
        self.assertFalse(commands.known(""))

    def test_help_has_one_line_per_usage(self):
        lines = commands.help_lines()
        self.assertEqual(len(lines), len(commands.COMMANDS))
        self.assertTrue(any(line.startswith("kick NAME [REASON] ") for line in lines))
        self.assertTrue(any(line.startswith("ban TARGET [DURATION] [REASON] ") for line in lines))
        self.assertEqual(len({line.index(c.description)
                              for line, c in zip(lines, commands.COMMANDS)}), 1)   # aligned



if __name__ == "__main__":
    unittest.main()
