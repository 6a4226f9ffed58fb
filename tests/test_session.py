"""The README's example session, verbatim, under every start method."""

import unittest

from support import TestCase, example_session, per_start_method


class ExampleSession(TestCase):
    start_method = None

    def test_example_session(self):
        s = self.server(workers=2, start_method=self.start_method)
        example_session(self.client(s, "Naman"), self.client(s, "Yudi"), self.client(s))


per_start_method(globals(), ExampleSession)

if __name__ == "__main__":
    unittest.main()
