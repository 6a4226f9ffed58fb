"""Logging an operator can read, and process titles an operator can find.

Every line carries a timestamp, the level and the process role with its pid
(``worker-2[1234]``), so the merged stderr of all processes reads as one log.
"""

import ctypes
import ctypes.util
import logging
import sys

FORMAT = "%(asctime)s %(levelname)-7s %(role)s[%(process)d] %(message)s"


class _RoleFilter(logging.Filter):
    def __init__(self, role):
        super().__init__()
        self.role = role

    def filter(self, record):
        record.role = self.role
        return True


def setup(role, level="INFO", path=None):
    """Send this process's log lines to stderr (or to the file ``path``),
    tagged with ``role``."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()      # a forked child's copy of the supervisor's log file
    handler = logging.FileHandler(path) if path else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(_RoleFilter(role))
    root.addHandler(handler)
    root.setLevel(level)


def reopen():
    """After logrotate moved the file: the next line opens it anew."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.close()      # FileHandler reopens on the next emit


def set_process_title(title):
    """Name the process (``ps -o comm``, ``/proc/PID/comm``) on Linux.

    Linux keeps 15 bytes. Elsewhere, or without libc, nothing happens: the
    roles and pids are in the log lines too.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        pr_set_name = 15
        libc.prctl(pr_set_name, ctypes.c_char_p(title.encode()[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        pass
