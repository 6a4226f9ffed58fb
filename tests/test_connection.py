"""Unit tests of a client connection's write path (chatlib/connection.py),
over a local socket pair: one system call per write, what a full socket
leaves at the head of the output, the last words of a cut connection, and
the selector interest."""

import selectors
import socket
import unittest

from support import UnitTestCase

from chatlib.connection import IOV_MAX, READ, WRITE, Client, drop_sent


class WritePath(UnitTestCase):

    def setUp(self):
        super().setUp()
        self.ours, self.peer = socket.socketpair()
        self.ours.setblocking(False)
        self.peer.settimeout(5)
        self.addCleanup(self.ours.close)
        self.addCleanup(self.peer.close)
        self.c = Client(self.ours, 1, "192.0.2.1", 4096, 0.0, 0)

    def owe(self, *chunks):
        for chunk in chunks:
            self.c.out.append(chunk)
            self.c.out_bytes += len(chunk)

    def received(self):
        data = b""
        self.peer.setblocking(False)
        try:
            while True:
                chunk = self.peer.recv(1 << 20)
                if not chunk:
                    break
                data += chunk
        except BlockingIOError:
            pass
        return data

    def fill(self):
        """Fill our socket's buffers: the next send takes nothing."""
        try:
            while True:
                self.ours.send(b"x" * 65536)
        except BlockingIOError:
            pass

    def test_everything_owed_goes_in_one_write(self):
        self.owe(b"MSG a hi\n", b"MSG b ho\n")
        self.assertEqual(self.c.write(False), 18)
        self.assertEqual((self.c.out, self.c.out_bytes, self.c.midline), ([], 0, False))
        self.assertEqual(self.received(), b"MSG a hi\nMSG b ho\n")

    def test_more_buffers_than_iov_max_are_joined(self):
        self.owe(*[b"%d\n" % i for i in range(IOV_MAX + 10)])
        self.c.write(False)
        self.assertEqual(self.c.out, [])
        self.assertEqual(self.received(), b"".join(b"%d\n" % i for i in range(IOV_MAX + 10)))

    def test_nothing_is_tried_while_waiting_for_writability(self):
        self.owe(b"PONG\n")
        self.c.interest = READ | WRITE
        self.assertEqual(self.c.write(False), 0)
        self.assertEqual(self.c.out, [b"PONG\n"])
        self.assertEqual(self.c.write(True), 5)
        self.assertEqual(self.c.out, [])

    def test_a_full_socket_keeps_the_output(self):
        self.fill()
        self.owe(b"OK\n")
        self.assertEqual(self.c.write(False), 0)
        self.assertEqual((self.c.out, self.c.out_bytes), ([b"OK\n"], 3))

    def test_consume_keeps_the_tail_and_knows_a_line_in_flight(self):
        self.owe(b"ab\n", b"cd\n", b"ef\n")
        self.c.consume(4)
        self.assertEqual((self.c.out, self.c.out_bytes, self.c.midline), ([b"d\n", b"ef\n"], 5, True))
        self.c.consume(2)
        self.assertEqual((self.c.out, self.c.out_bytes, self.c.midline), ([b"ef\n"], 3, False))
        self.c.consume(0)
        self.assertEqual((self.c.out, self.c.midline), ([b"ef\n"], False))

    def test_last_words_go_at_once_when_the_socket_takes_them(self):
        self.owe(b"MSG a hi\n")
        self.assertTrue(self.c.last_words(b"ERR idle-timeout\n"))
        self.assertEqual(self.received(), b"MSG a hi\nERR idle-timeout\n")

    def test_last_words_of_a_full_socket_finish_the_line_in_flight(self):
        self.fill()
        self.owe(b"MSG a hi\n", b"MSG b ho\n")
        self.c.midline = True                   # the kernel took "MSG a" already
        self.assertFalse(self.c.last_words(b"ERR slow-consumer\n"))
        self.assertEqual(self.c.out, [b"MSG a hi\nERR slow-consumer\n"])
        self.assertEqual(self.c.out_bytes, len(self.c.out[0]))

    def test_last_words_of_a_full_socket_between_lines(self):
        self.fill()
        self.owe(b"MSG a hi\n", b"MSG b ho\n")
        self.assertFalse(self.c.last_words(b"ERR slow-consumer\n"))
        self.assertEqual(self.c.out, [b"ERR slow-consumer\n"])

    def test_the_selector_is_told_what_the_connection_waits_for(self):
        sel = selectors.DefaultSelector()
        self.addCleanup(sel.close)
        self.c.watch(sel, 0)
        self.assertEqual((sel.get_key(self.ours).events, self.c.interest), (READ, READ))
        self.c.watch(sel, WRITE)
        self.assertEqual(sel.get_key(self.ours).events, READ | WRITE)
        self.c.held = [b"WHO"]                  # lines held: not read any further
        self.c.update_interest(sel)
        self.assertEqual(sel.get_key(self.ours).events, WRITE)
        self.c.watch(sel, 0)
        self.assertRaises(KeyError, sel.get_key, self.ours)
        self.assertEqual(self.c.interest, 0)
        self.c.held, self.c.closing = None, "quit"     # closing: not read either
        self.c.watch(sel, WRITE)
        self.assertEqual(sel.get_key(self.ours).events, WRITE)
        self.c.close(sel)
        self.assertEqual(sel.get_map(), {})
        self.assertIsNone(self.c.sock)
        self.assertEqual(self.ours.fileno(), -1)


if __name__ == "__main__":
    unittest.main()


class DropSent(UnitTestCase):
    """The partial-send trim that the client write path and the broker link share."""

    def test_every_cut(self):
        data = [b"ab\n", b"c", b"de\n"]
        whole = b"".join(data)
        for sent in range(len(whole) + 1):
            buffers = list(data)
            last = drop_sent(buffers, sent)
            self.assertEqual(b"".join(buffers), whole[sent:])
            cut = sent not in (0, 3, 4, 7)               # inside a buffer
            self.assertEqual(last, whole[sent - 1:sent] if cut else None, sent)

