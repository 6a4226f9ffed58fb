"""The hand-off pipe, acceptor to worker: one accepted socket per message,
and which listener it came from.

What ``multiprocessing.reduction.sendfds`` and ``recvfds`` do for one
descriptor (``SCM_RIGHTS``, and on macOS a byte of acknowledgement back,
read from the module's ``ACKNOWLEDGE`` flag at every call as they do), with
the one byte of payload saying *plaintext* or *TLS* instead of a count. So a
hand-off costs the same one ``sendmsg`` whichever port the client used.

And the other way a descriptor reaches a child, unwanted: ``fork``
(:func:`inherited_by_fork`).
"""

import array
import socket
from multiprocessing import reduction, util
from multiprocessing.connection import Connection

PLAIN = b"P"
TLS = b"T"
_FD_SPACE = socket.CMSG_SPACE(array.array("i").itemsize)


def send_socket(pipe, fd, kind):
    """Hand descriptor ``fd`` over ``pipe``, tagged ``kind`` (PLAIN or TLS)."""
    pipe.sendmsg([kind], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
    if reduction.ACKNOWLEDGE and pipe.recv(1) != b"A":
        raise RuntimeError("did not receive acknowledgement of fd")


def recv_socket(pipe):
    """``(fd, kind)`` of the next hand-off.

    As ``recvfds``: BlockingIOError when there is none, EOFError when the
    acceptor is gone, RuntimeError when the descriptor did not survive the
    trip (this process had no descriptor left for it: the kernel dropped it).
    """
    msg, ancdata, flags, addr = pipe.recvmsg(1, _FD_SPACE)
    if not msg and not ancdata:
        raise EOFError
    if reduction.ACKNOWLEDGE:
        pipe.send(b"A")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
            if len(fds) == 1 and msg in (PLAIN, TLS):
                return fds[0], msg
            for fd in fds:
                socket.close(fd)
    raise RuntimeError("received %d items of ancdata" % len(ancdata))


def inherited_by_fork(obj):
    """Have a child forked from now on close ``obj`` (a socket or a
    ``Connection`` of the supervisor's) at once; return ``obj``. Under
    ``spawn`` and ``forkserver`` a child inherits nothing anyway."""
    util.register_after_fork(obj, Connection.close if isinstance(obj, Connection)
                             else socket.socket.close)
    return obj
