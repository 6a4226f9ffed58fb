"""On a system without Unix-socket descriptor passing (Windows), the entry
point stops at once with one line and exit status 2.

Windows is simulated: ``socket.SCM_RIGHTS``, which the check looks at, is
taken away, and so are modules Windows lacks (``resource``), or that must
not be reached (the supervisor), so that an import of one fails the test.
"""

import contextlib
import io
import socket
import sys
import unittest
from unittest import mock

from support import BROKER, run_to_exit

HINT = "chat-server runs on Linux and macOS; on Windows, use WSL\n"

# What a Windows Python lacks, taken away before broker.py runs.
AS_ON_WINDOWS = """
import socket, sys
del socket.SCM_RIGHTS
sys.modules["resource"] = None
"""


@contextlib.contextmanager
def without_scm_rights():
    saved = socket.SCM_RIGHTS
    del socket.SCM_RIGHTS
    try:
        yield
    finally:
        socket.SCM_RIGHTS = saved


class Windows(unittest.TestCase):

    def test_main_stops_before_anything_else(self):
        import broker
        stderr = io.StringIO()
        blocked = {"resource": None, "chatlib.config": None, "chatlib.supervisor": None}
        with without_scm_rights(), mock.patch.dict(sys.modules, blocked), \
                contextlib.redirect_stderr(stderr):
            status = broker.main(["--port", "0"])
        self.assertEqual(status, 2)
        self.assertEqual(stderr.getvalue(), HINT)

    def test_python_broker_py(self):
        """``python broker.py`` as a user runs it: no traceback, status 2."""
        code = AS_ON_WINDOWS + "import runpy\nsys.argv = [%r]\nrunpy.run_path(sys.argv[0], " \
            "run_name='__main__')" % BROKER
        self.assertEqual(run_to_exit(sys.executable, "-c", code, timeout=30), (2, "", HINT))

    @unittest.skipUnless(sys.platform.startswith(("linux", "darwin")), "Linux or macOS")
    def test_linux_and_macos_pass_the_check(self):
        self.assertTrue(hasattr(socket, "SCM_RIGHTS"))


if __name__ == "__main__":
    unittest.main()
