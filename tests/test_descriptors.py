"""Every child holds only the descriptors it needs, under every start method.

Read from Linux's ``/proc``: the listening sockets' inodes (``/proc/net/tcp``)
and every process's descriptors (``/proc/PID/fd``). Only the supervisor and
the acceptor may hold a listening socket, plaintext or TLS; and no socket is
held by two processes of the server at all besides those (each end of a
socket pair has its own inode: a shared one is a leaked copy).
"""

import sys
import unittest

from support import (TestCase, kill_and_replace, per_start_method, process_role, self_signed,
                     socket_inodes, tcp_sockets, tls_client)


def listening_inodes(ports):
    """Inodes of the TCP sockets listening on ``ports``."""
    return {inode for lport, _, state, inode in tcp_sockets()
            if lport in ports and state == "0A"}


@unittest.skipUnless(sys.platform.startswith("linux"), "reads /proc")
class Descriptors(TestCase):
    start_method = None

    def check(self, s, ports):
        listening = listening_inodes(ports)
        self.assertEqual(len(listening), len(ports))
        held = {pid: socket_inodes(pid) for pid in s.pids()}
        role = {pid: process_role(pid) or "main" for pid in held}
        main = s.proc.pid
        holders = sorted(role[pid] if pid != main else "main"
                         for pid, socks in held.items() if socks & listening)
        self.assertEqual(holders, ["chat-acceptor", "main"], role)
        for inode in listening:
            self.assertEqual(sorted(role[pid] if pid != main else "main"
                                    for pid, socks in held.items() if inode in socks),
                             ["chat-acceptor", "main"])
        # Nothing else is shared: not the supervisor's ends of the children's
        # pipes, not its signal wake-up socket.
        for pid, socks in held.items():
            for other, theirs in held.items():
                if other != pid:
                    self.assertEqual(socks & theirs - listening, set(),
                                     "%s and %s share sockets" % (role[pid], role[other]))

    def test_plaintext(self):
        s = self.server(workers=2, start_method=self.start_method)
        self.client(s, "x")                   # every process has done its work once
        self.check(s, {s.port})

    def test_plaintext_and_tls_after_restarts(self):
        s = self.server(tls=self_signed(self.tmpdir("descriptors")), workers=2,
                        start_method=self.start_method)
        # A child started later must not pick up what the earlier ones got.
        for title in ("chat-worker-0", "chat-acceptor", "chat-broker"):
            kill_and_replace(s, [title], 5.0)
        c = tls_client(s.tls_port)
        self.addCleanup(c.close)
        c.login("t")
        self.client(s, "p")
        self.check(s, {s.port, s.tls_port})


per_start_method(globals(), Descriptors)

if __name__ == "__main__":
    unittest.main()
