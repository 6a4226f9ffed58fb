"""The control socket's server: a sans-IO session per connection, and the
non-blocking Unix socket around it that the supervisor runs in its loop.

:class:`ControlSession` is the wire rules of :mod:`chatlib.control` with no
socket and no clock: bytes in, command lines out, answers in, bytes out.
:class:`ControlServer` reads, writes and times out around it, and never
blocks: the supervisor passes :meth:`ControlServer.waitables` to its
``multiprocessing.connection.wait``, hands back what is ready with
:meth:`~ControlServer.on_ready`, and calls :meth:`~ControlServer.flush`
every turn (waiting ~10 ms at most while :attr:`~ControlServer.writing`:
its ``wait`` cannot wake for writability).

Who may talk: whoever can connect to the socket can kick, ban and read
every user's address, so the socket is made 0600 in a directory its user
alone may write (created 0700 when missing), and a symbolic link, someone
else's directory or one that group or others may write is refused. On Linux
the peer's uid is checked as well (``SO_PEERCRED``): only the server's own
and root. On macOS Python has no portable peer-credential call: there the
directory and the socket's mode are the whole protection (a
``socket.LOCAL_PEERCRED``, where Python has one, is used).
"""

import collections
import contextlib
import logging
import os
import socket
import stat
import struct
import sys
import time

from chatlib.handoff import inherited_by_fork

MAX_LINE = 64 << 10           # bytes in a command line, its LF included
MAX_OUTPUT = 32 << 20         # unsent bytes a connection may owe before it is dropped
MAX_CONNECTIONS = 32          # control connections at once
IDLE_TIMEOUT = 300.0          # seconds with no byte in or out before a close
RECV_SIZE = MAX_LINE          # bytes read at once: a session holds at most one
                              # line and one read (rule 1 of ControlSession)
PROBE_TIMEOUT = 1.0           # seconds to learn whether a server answers at a socket
SYSTEMD_RUNTIME_DIRECTORY = "/run/chat-server"   # the unit's RuntimeDirectory=

# What the client reads as the end of an answer (see is_last_line).
OK = "OK"
ERR = "ERR"


class ControlError(Exception):
    """The control socket cannot be opened; the message is one line for the operator."""


def is_last_line(line):
    """Whether ``line`` (no LF) ends an answer: ``OK``, ``ERR`` or ``ERR reason``."""
    return line == OK or line == ERR or line.startswith(ERR + " ")


def last_line(error=None):
    """The line that ends an answer: ``OK`` when ``error`` is None, else ``ERR error``."""
    return OK if error is None else _one_line("%s %s" % (ERR, error)).rstrip()


def _one_line(text):
    """``text`` with any CR and LF taken out: the framing is the server's."""
    if "\n" in text or "\r" in text:
        return text.replace("\r", "").replace("\n", "")
    return text


def _body_line(text):
    """A line of an answer, which may never read as its last one."""
    text = _one_line(text)
    return " " + text if is_last_line(text) else text


class ControlSession:
    """One control connection's framing and state, without a socket or a clock.

    The rules it keeps:

    1. A command is handed out by :meth:`next_command` only once the one
       before it has been answered (:meth:`answer`): one at a time, in
       order. Meanwhile :attr:`wants_data` is False and the socket is not
       read, so what waits here is at most one line and one read.
    2. A blank line is skipped; a line that is not UTF-8 is answered here,
       in its turn, with ``ERR bad-encoding``.
    3. A line longer than ``max_line`` bytes (its LF included) is answered
       here with ``ERR line-too-long`` once that many bytes have come
       without an LF: what was buffered is dropped and nothing more is
       taken (:attr:`wants_data` stays False). Once the answer is sent the
       session is over (:attr:`must_close`).
    4. At the end of the stream (:meth:`receive` of ``b""``) the lines
       already received are still answered, an unfinished last one too;
       then the session is over.
    5. Output waits in :attr:`pending_output` until :meth:`sent` says it
       went. Past ``max_output`` bytes the session is dropped at once, its
       output discarded (:attr:`dropped`).
    """

    def __init__(self, max_line=MAX_LINE, max_output=MAX_OUTPUT):
        self.max_line = max_line
        self.max_output = max_output
        self.received = bytearray()   # bytes not handed out yet: lines, then part of one
        self.scan = 0                 # where an LF may be that was not looked for yet
        self.pending_output = bytearray()
        self.awaiting = False         # a command handed out, its answer not given yet
        self.ended = False            # nothing more is taken: end of stream, or a line too long
        self.dropped = False          # over max_output: close at once, unsent

    @property
    def wants_data(self):
        """Whether the connection should be read now."""
        return not (self.awaiting or self.ended or self.dropped)

    @property
    def must_close(self):
        """Whether the connection is done with: dropped, or over with all its output sent."""
        return self.dropped or (self.ended and not self.awaiting and not self.received
                                and not self.pending_output)

    def receive(self, data):
        """Bytes read from the peer; ``b""`` at the end of the stream."""
        if self.ended or self.dropped:
            return
        if data:
            self.received += data
        else:
            self.ended = True

    def next_command(self):
        """The next command line (str, stripped) to answer, or None: none
        has come whole yet, or the one before still awaits its answer."""
        if self.awaiting or self.dropped:
            return None
        received = self.received
        while received:
            end = received.find(b"\n", self.scan)
            if end < 0:
                self.scan = len(received)
                if len(received) >= self.max_line:
                    return self._too_long()
                if not self.ended:
                    return None
                end = len(received)           # an unfinished last line
            elif end >= self.max_line:
                return self._too_long()
            raw = bytes(received[:end])
            del received[:end + 1]
            self.scan = 0
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                self._queue([], "bad-encoding")
                continue
            if line:
                self.awaiting = True
                return line
        return None

    def _too_long(self):
        self.received.clear()
        self.scan = 0
        self.ended = True
        self._queue([], "line-too-long")
        return None

    def answer(self, lines, error=None):
        """The answer to the command handed out last: ``lines`` (str, each
        without its LF), then ``OK``, or ``ERR error`` if ``error`` is not None."""
        if not self.awaiting:
            raise RuntimeError("no control command awaits an answer")
        self.awaiting = False
        self._queue(lines, error)

    def _queue(self, lines, error):
        if self.dropped:
            return
        text = "".join([_body_line(line) + "\n" for line in lines])
        self.pending_output += (text + last_line(error) + "\n").encode("utf-8", "replace")
        if len(self.pending_output) > self.max_output:
            self.dropped = True
            self.pending_output = bytearray()

    def sent(self, count):
        """The first ``count`` bytes of :attr:`pending_output` went out."""
        del self.pending_output[:count]


Peer = collections.namedtuple("Peer", "pid uid")     # pid None where the system does not say

_UCRED = struct.Struct("3i")          # Linux's struct ucred: pid, uid, gid
_XUCRED = struct.Struct("=2I")        # the BSDs' struct xucred begins: version, uid
_XUCRED_SIZE = 4 + 4 + 4 + 16 * 4 + 8    # the whole of it, with room to spare


def peer_credentials(sock):
    """The :class:`Peer` at the other end of the Unix socket ``sock``, or
    None where Python cannot ask (macOS without ``socket.LOCAL_PEERCRED``)."""
    if sys.platform.startswith("linux"):
        pid, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                    _UCRED.size))
        return Peer(pid, uid)
    if hasattr(socket, "LOCAL_PEERCRED"):
        try:
            data = sock.getsockopt(getattr(socket, "SOL_LOCAL", 0), socket.LOCAL_PEERCRED,
                                   _XUCRED_SIZE)
        except OSError:
            return None
        return Peer(None, _XUCRED.unpack_from(data)[1])
    return None


def _runtime_paths(port):
    """The paths a server on ``port`` may use, by preference."""
    name = "%d.sock" % port
    paths = []
    runtime = os.environ.get("RUNTIME_DIRECTORY")
    if runtime:
        paths.append(os.path.join(runtime.split(":")[0], name))
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        paths.append(os.path.join(xdg, "chat-server", name))
    # Not tempfile.gettempdir(): $TMPDIR may differ between the server's
    # environment and the operator's shell, and both must find the socket.
    paths.append(os.path.join("/tmp", "chat-server-%d" % os.geteuid(), name))
    return paths


def default_socket_path(port):
    """Where a server on ``port`` puts its control socket: the first of
    ``$RUNTIME_DIRECTORY/<port>.sock`` (systemd's ``RuntimeDirectory=``),
    ``$XDG_RUNTIME_DIR/chat-server/<port>.sock`` and
    ``/tmp/chat-server-<euid>/<port>.sock``. The port is in the name, so
    that two servers on one host never share a socket."""
    return _runtime_paths(port)[0]


def candidate_paths(port):
    """Where ``ctl`` looks for the socket of the server on ``port``, in
    order: the paths :func:`default_socket_path` chooses from, then the
    systemd unit's runtime directory (an operator's shell has no
    ``$RUNTIME_DIRECTORY``)."""
    paths = _runtime_paths(port)
    paths.append(os.path.join(SYSTEMD_RUNTIME_DIRECTORY, "%d.sock" % port))
    return list(dict.fromkeys(paths))


def _reason(exc):
    return exc.strerror or str(exc)


def _secure_directory(directory):
    """Make sure that the user alone may write ``directory``: create it
    (mode 0700, its parents as needed) if it is missing; refuse a symbolic
    link, someone else's directory, or one group or others may write."""
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        try:
            os.makedirs(os.path.dirname(directory), exist_ok=True)
            os.mkdir(directory, 0o700)
            os.chmod(directory, 0o700)          # whatever the umask
        except FileExistsError:
            pass                                # made meanwhile: checked below
        except OSError as exc:
            raise ControlError("cannot create %s for the control socket: %s"
                               % (directory, _reason(exc)))
        st = os.lstat(directory)
    euid = os.geteuid()
    if stat.S_ISLNK(st.st_mode):
        problem = "is a symbolic link"
    elif not stat.S_ISDIR(st.st_mode):
        problem = "is not a directory"
    elif st.st_uid != euid:
        problem = "belongs to uid %d, not to this server's uid %d" % (st.st_uid, euid)
    elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problem = "may be written by group or others (mode %03o)" % stat.S_IMODE(st.st_mode)
    else:
        return
    raise ControlError("the control socket's directory %s %s: give it a directory "
                       "of its own, or remove this one" % (directory, problem))


def _remove_stale(path):
    """Remove a socket left at ``path`` by a server that is gone (nothing
    answers a connect); refuse one a live server uses, and anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError("%s exists and is not a socket: remove it, or choose "
                           "another path for the control socket" % path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(PROBE_TIMEOUT)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    except FileNotFoundError:
        return
    except socket.timeout:
        pass                                    # its backlog is full: live
    except OSError as exc:
        raise ControlError("cannot tell whether a server uses the control socket %s: %s"
                           % (path, _reason(exc)))
    finally:
        probe.close()
    raise ControlError("another server is using the control socket %s" % path)


def _tell(sock, error):
    """Send ``ERR error`` unasked, before a close, if the kernel takes it at once."""
    try:
        sock.send((last_line(error) + "\n").encode())
    except OSError:
        pass


class _Connection:
    """Everything the server knows about one control connection, made and dropped together."""

    def __init__(self, sock, who, now, max_output):
        self.sock = sock
        self.who = who                # "uid U pid P", for the log
        self.session = ControlSession(max_output=max_output)
        self.last_progress = now      # when a byte last came in or went out
        self.closed = False


class ControlServer:
    """The control socket at ``path``: ``on_command(line, reply)`` gets every
    command; ``reply(lines, error=None)`` answers it, once, at once or in a
    later turn (when the connection has gone meanwhile, it does nothing)."""

    def __init__(self, path, on_command, log=None, *, max_connections=MAX_CONNECTIONS,
                 idle_timeout=IDLE_TIMEOUT, max_output=MAX_OUTPUT):
        self.path = path
        self.on_command = on_command
        self.log = log or logging.getLogger("control")
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.max_output = max_output
        self.listener = None
        self.identity = None          # (st_dev, st_ino) of the socket file we made
        self.connections = {}         # socket -> _Connection

    # -- the supervisor's side --------------------------------------------------

    def open(self):
        """Listen; :class:`ControlError` with one line saying why not."""
        _secure_directory(os.path.dirname(os.path.abspath(self.path)))
        _remove_stale(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bound = False
        try:
            old_umask = os.umask(0o177)
            try:
                sock.bind(self.path)
            finally:
                os.umask(old_umask)
            bound = True
            os.chmod(self.path, 0o600)
            st = os.lstat(self.path)
            sock.listen(self.max_connections)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            if bound:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
            raise ControlError("cannot listen on the control socket %s: %s"
                               % (self.path, _reason(exc)))
        self.identity = (st.st_dev, st.st_ino)
        self.listener = inherited_by_fork(sock)

    def close(self):
        """Close every connection and the socket, and remove its file (if it
        is still the one this server made)."""
        for conn in list(self.connections.values()):
            self._close(conn, "server closing")
        if self.listener is None:
            return
        self.listener.close()
        self.listener = None
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self.identity:
                os.unlink(self.path)
        except OSError:
            pass

    def waitables(self):
        """The sockets to wait on for reading: the listening one, and each
        connection that may be read now (rule 1 of :class:`ControlSession`)."""
        if self.listener is None:
            return []
        return [self.listener] + [conn.sock for conn in self.connections.values()
                                  if conn.session.wants_data]

    def on_ready(self, obj):
        """Handle ``obj``, one of :meth:`waitables` that ``wait`` returned
        (one closed meanwhile is ignored)."""
        if obj is not None and obj is self.listener:
            self._accept()
            return
        conn = self.connections.get(obj)
        if conn is None or not conn.session.wants_data:    # closed or busy meanwhile
            return
        try:
            data = conn.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._close(conn, _reason(exc))
            return
        conn.last_progress = time.monotonic()
        conn.session.receive(data)
        self._serve(conn)

    @property
    def writing(self):
        """Whether some connection has output waiting: :meth:`flush` soon."""
        return any(conn.session.pending_output for conn in self.connections.values())

    def flush(self):
        """Every turn: write what waits, run the commands that waited for an
        answer given since, close the connections that are done or idle."""
        now = time.monotonic()
        for conn in list(self.connections.values()):
            self._serve(conn)
            if not conn.closed and now - conn.last_progress > self.idle_timeout:
                if not conn.session.pending_output:
                    _tell(conn.sock, "idle-timeout")
                self._close(conn, "idle for %.0f s" % (now - conn.last_progress))

    # -- connections ------------------------------------------------------------

    def _accept(self):
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:              # out of descriptors: try next turn
                self.log.warning("control socket: cannot accept: %s", _reason(exc))
                return
            self._admit(sock)

    def _admit(self, sock):
        sock.setblocking(False)
        try:
            peer = peer_credentials(sock)
        except OSError as exc:                  # it has gone already
            self.log.debug("control connection dropped: %s", _reason(exc))
            sock.close()
            return
        euid = os.geteuid()
        who = "peer unknown" if peer is None else \
            "uid %d pid %s" % (peer.uid, "?" if peer.pid is None else peer.pid)
        if peer is not None and peer.uid not in (euid, 0):
            self.log.warning("control connection refused: %s is neither this "
                             "server's uid %d nor root", who, euid)
            _tell(sock, "permission-denied")
            sock.close()
            return
        if len(self.connections) >= self.max_connections:
            self.log.debug("control connection refused (%s): %d open already",
                           who, len(self.connections))
            _tell(sock, "too-many-connections")
            sock.close()
            return
        self.connections[sock] = _Connection(inherited_by_fork(sock), who, time.monotonic(),
                                             self.max_output)
        self.log.debug("control connection accepted (%s)", who)

    def _serve(self, conn):
        """Run the commands ``conn`` has ready, then write what it can."""
        while not conn.closed:
            line = conn.session.next_command()
            if line is None:
                break
            self._dispatch(conn, line)
        self._write(conn)

    def _dispatch(self, conn, line):
        answered = False

        def reply(lines, error=None):
            nonlocal answered
            if answered:
                self.log.error("control command %r answered twice: the second "
                               "answer is dropped", line)
                return
            answered = True
            if not conn.closed:
                conn.session.answer(lines, error)   # written by _serve or flush

        try:
            self.on_command(line, reply)
        except Exception:
            # One command's bug must not stop the server it controls.
            self.log.exception("control command %r failed", line)
            if not answered:
                reply([], "internal-error")

    def _write(self, conn):
        session = conn.session
        while session.pending_output and not conn.closed:
            try:
                count = conn.sock.send(session.pending_output)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._close(conn, _reason(exc))
                return
            session.sent(count)
            conn.last_progress = time.monotonic()
        if session.must_close and not conn.closed:
            self._close(conn, "its output unread past %d bytes" % self.max_output
                        if session.dropped else "done")

    def _close(self, conn, why):
        conn.closed = True
        del self.connections[conn.sock]
        conn.sock.close()
        self.log.debug("control connection closed (%s): %s", conn.who, why)
