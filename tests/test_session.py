"""The README's example session, verbatim, under every start method."""

import unittest

from support import TestCase, per_start_method


class ExampleSession(TestCase):
    start_method = None

    def test_example_session(self):
        s = self.server(workers=2, start_method=self.start_method)
        naman = self.client(s, "Naman")
        yudi = self.client(s, "Yudi")
        naman.send("MSG hi everyone!", "MSG how are you?")
        yudi.expect("MSG Naman hi everyone!", "MSG Naman how are you?")
        naman.expect_nothing_more()        # no echo of one's own messages
        yudi.send("MSG hello Naman!")
        yudi.send("WHO")
        yudi.expect("USER Naman", "USER Yudi")
        yudi.send("DM Naman secret message")
        yudi.send("PING")
        yudi.expect("PONG")
        yudi.close()
        naman.expect("MSG Yudi hello Naman!", "DM Yudi secret message",
                     "INFO Yudi disconnected")
        third = self.client(s)
        third.send("LOGIN Naman")
        third.expect("ERR username-taken")
        third.send("LOGIN naman")
        third.expect("ERR username-taken")


per_start_method(globals(), ExampleSession)

if __name__ == "__main__":
    unittest.main()
