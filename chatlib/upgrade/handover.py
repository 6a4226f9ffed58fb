"""The hand-over pipe, old worker to new: connections, with their state.

A socket pair the supervisor makes for one switch. First a header (the
state's version, how many connections follow, the worker's own state),
then the connections in chunks: each chunk's records, pickled, then its
descriptors in one ``sendfds`` (``SCM_RIGHTS``; at most ``CHUNK`` per
message, under the kernel's limit of 253). The pickle never crosses a
trust boundary: both ends are this server's processes, on a pipe nobody
else holds. Blocking on both ends: the sender has stopped serving, the
receiver has not started.
"""

import pickle
import struct
from multiprocessing import reduction

CHUNK = 128
_HEADER = struct.Struct("!II")      # pickle length, descriptors after it


def send(sock, header, connections):
    """``connections``: [(record, fd)]. The descriptors stay open here."""
    _send_chunk(sock, dict(header, count=len(connections)), [])
    for start in range(0, len(connections), CHUNK):
        chunk = connections[start:start + CHUNK]
        _send_chunk(sock, [fields for fields, _ in chunk], [fd for _, fd in chunk])


def receive(sock):
    """``(header, [(record, fd)])``; the descriptors are ours to close.
    EOFError: the sender died half-way."""
    header, _ = _receive_chunk(sock)
    connections = []
    while len(connections) < header["count"]:
        records, fds = _receive_chunk(sock)
        connections.extend(zip(records, fds))
    return header, connections


def _send_chunk(sock, data, fds):
    body = pickle.dumps(data, pickle.HIGHEST_PROTOCOL)
    sock.sendall(_HEADER.pack(len(body), len(fds)) + body)
    if fds:
        reduction.sendfds(sock, fds)


def _receive_chunk(sock):
    size, count = _HEADER.unpack(_exactly(sock, _HEADER.size))
    data = pickle.loads(_exactly(sock, size))
    return data, reduction.recvfds(sock, count) if count else []


def _exactly(sock, size):
    """``size`` bytes, never one more: the descriptors ride on the byte after."""
    parts = []
    while size:
        part = sock.recv(size)
        if not part:
            raise EOFError("the hand-over pipe closed half-way")
        parts.append(part)
        size -= len(part)
    return b"".join(parts)
