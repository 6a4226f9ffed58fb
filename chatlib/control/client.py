"""``chat-server ctl COMMAND [ARGS...]``: one command to a running server.

Sends the command as one line over the control socket, prints the answer's
lines and turns its last line into the exit status; with no command (or
``-``) it runs one command per line of stdin, for scripts. It never prints a
traceback for the operator's mistakes: every failure is one line on stderr.
"""

import argparse
import errno
import os
import socket
import sys

from chatlib.config import DEFAULT_PORT, _default_port, _port, _seconds, program_name
from chatlib.control import commands
from chatlib.control.server import OK, candidate_paths, is_last_line

EXIT_OK = 0             # every command answered OK
EXIT_ERR = 1            # a command answered ERR
EXIT_TROUBLE = 2        # no server to talk to, or it stopped talking
DEFAULT_TIMEOUT = 10.0


class Trouble(Exception):
    """Talking to the server failed; the message is the one line for stderr."""


# How candidate_paths chooses, for --help: keep the two together.
_PATHS_HELP = """\
Without --control, ctl uses the first of these that a server answers on
(PORT: --port, else $PORT, else %d):
  $RUNTIME_DIRECTORY/PORT.sock            (systemd's RuntimeDirectory=, if set)
  $XDG_RUNTIME_DIR/chat-server/PORT.sock  (if set)
  /tmp/chat-server-EUID/PORT.sock         (EUID: your effective uid, here %d)
  /run/chat-server/PORT.sock              (a systemd unit's, from another shell)
By hand: socat - UNIX-CONNECT:PATH"""

_EXIT_HELP = """\
exit status:
  0  the answer was OK (commands from stdin: every answer)
  1  a command was refused: its ERR line goes to stderr
  2  no server could be reached, or it closed the connection or did not
     answer in time, or the command line is wrong"""


def build_parser():
    p = argparse.ArgumentParser(
        prog="%s ctl" % program_name(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Send COMMAND to a running chat server over its control socket\n"
                    "and print the answer. With no COMMAND, or -, read commands\n"
                    "from stdin, one per line.",
        epilog="commands:\n%s\n\n%s\n\n%s" % (
            "\n".join("  " + line for line in commands.help_lines()), _EXIT_HELP,
            _PATHS_HELP % (DEFAULT_PORT, os.geteuid())))
    p.add_argument("--control", metavar="PATH", default=None,
                   help="the server's control socket (default: found from the port)")
    p.add_argument("-p", "--port", type=_port, default=None,
                   help="the server's TCP port, which names its control socket "
                        "(default: $PORT if set, else %d)" % DEFAULT_PORT)
    p.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT, metavar="S",
                   help="seconds to wait for the server to answer (default: %g)"
                        % DEFAULT_TIMEOUT)
    p.add_argument("command", nargs="?", metavar="COMMAND",
                   help="the command (see below); - or none: read them from stdin")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="its arguments")
    return p


def main(argv=None):
    """Run ``ctl`` with ``argv`` (default: ``sys.argv[1:]``); the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        paths = [args.control] if args.control else candidate_paths(_chosen_port(args, parser))
        script = _script(args, parser)
    except SystemExit as exc:                   # --help, or a usage error (printed)
        return exc.code
    try:
        with connect(paths, args.timeout) as sock, sock.makefile("rb") as reader:
            return run(sock, reader, script)
    except Trouble as exc:
        sys.stderr.write("%s: %s\n" % (parser.prog, exc))
        return EXIT_TROUBLE
    except BrokenPipeError:                     # stdout closed: `ctl users | head`
        _silence_stdout()
        return EXIT_ERR
    except KeyboardInterrupt:
        return 130


def _chosen_port(args, parser):
    """--port, else $PORT, else the default: as the server chooses its own."""
    if args.port is not None:
        return args.port
    try:
        return _default_port()
    except (ValueError, argparse.ArgumentTypeError):
        parser.error("PORT environment variable is not a valid port")


def _script(args, parser):
    """The command lines to send, as bytes: the one of the command line, or
    stdin's (read as they come, so that a pipe can be typed into)."""
    if args.command in (None, "-"):
        if args.args:
            parser.error("- takes no arguments: the commands come from stdin")
        stdin = getattr(sys.stdin, "buffer", sys.stdin)
        lines = (line.strip() for line in stdin)
        return (line for line in lines if line)     # a blank line gets no answer
    words = [args.command] + args.args
    if commands.takes_secret(words):
        if len(words) > 3:
            parser.error("a password is never given on the command line (ps shows it to "
                         "everyone): ctl asks for it, or reads it from stdin")
        words.append(read_secret("password for %s: " % words[2]))
    line = " ".join(words)
    if "\n" in line or "\r" in line or not line.strip():
        parser.error("a command is one line, and not blank")
    # Arguments that are not UTF-8 go as they are: the server says bad-encoding.
    return [line.encode("utf-8", "surrogateescape")]


def read_secret(prompt):
    """A password: asked without echo at a terminal, else the first line of
    stdin (for scripts: ``printf '%s\\n' "$PW" | chat-server ctl account add bob``)."""
    if sys.stdin.isatty():
        import getpass
        return getpass.getpass(prompt)
    return sys.stdin.readline().rstrip("\r\n")


def connect(paths, timeout):
    """A socket connected to the first of ``paths`` that a server answers
    on; :class:`Trouble` naming every path and why, if none does."""
    failures = []
    for path in paths:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            return sock
        except socket.timeout:
            why = "timed out"
        except OSError as exc:
            why = _why_not(exc)
        sock.close()
        failures.append("%s: %s" % (path, why))
    raise Trouble("no server answers on its control socket: %s" % "; ".join(failures))


def _why_not(exc):
    if exc.errno == errno.ENOENT:
        return "no such socket"
    if exc.errno == errno.ECONNREFUSED:
        return "connection refused (left by a server that is gone?)"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied (not the server's user?)"
    return exc.strerror or str(exc)


def run(sock, reader, script):
    """Send each command of ``script`` (bytes) in turn, reading its answer
    from ``reader`` before the next; the exit status: EXIT_ERR if any
    answered ERR. :class:`Trouble` if the server stops answering."""
    status = EXIT_OK
    for line in script:
        try:
            sock.sendall(line + b"\n")
        except OSError:
            pass        # it closed on us: what it said first is read below
        if not answer_ok(reader, line.decode("utf-8", "replace")):
            status = EXIT_ERR
    return status


def answer_ok(reader, command):
    """Print the answer to ``command``, its lines to stdout, an ERR line to
    stderr; whether it was OK."""
    while True:
        try:
            raw = reader.readline()
        except socket.timeout:
            raise Trouble("no answer to %r from the server in time" % _short(command))
        except ConnectionResetError:
            raw = b""
        except OSError as exc:
            raise Trouble("connection to the server lost: %s" % (exc.strerror or exc))
        if not raw.endswith(b"\n"):
            raise Trouble("the server closed the connection before answering %r"
                          % _short(command))
        line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
        if is_last_line(line):
            sys.stdout.flush()                  # each answer whole before the next
            if line != OK:
                sys.stderr.write(line + "\n")
            return line == OK
        sys.stdout.write(line + "\n")


def _short(command, width=40):
    return command if len(command) <= width else command[:width] + "..."


def _silence_stdout():
    """After a broken pipe: send what is still buffered for stdout nowhere,
    so that the interpreter's exit does not complain about it."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass
