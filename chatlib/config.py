"""Command line: every knob an operator has, with its default, in one place.

The parsed options travel to every child process as one small picklable
object, so nothing depends on state inherited through ``fork``.
"""

import argparse
import multiprocessing
import os
import re
import sys

from chatlib import __version__

PRODUCT = "chat-server"          # pyproject.toml's name: what --version prints
DEFAULT_PORT = 4000
DEFAULT_TLS_PORT = 6697          # the IRC port for TLS, a convention chat users know
DEFAULT_TLS_HANDSHAKE_TIMEOUT = 10.0


def _ranged(convert, low, high=None, above=False, unit=""):
    """An argparse type: ``convert`` the text, then insist on a range.

    Written as ``not (in range)`` so that a NaN is refused too.
    """
    def check(text):
        value = convert(text)
        if above:
            ok, rule = value > low, "more than %s" % low
        elif high is not None:
            ok, rule = low <= value <= high, "%s..%s" % (low, high)
        else:
            ok, rule = value >= low, "at least %s%s" % (low, unit)
        if not ok:
            raise argparse.ArgumentTypeError("must be %s, got %s" % (rule, text))
        return value
    check.__name__ = "integer" if convert is int else "number"
    return check


_port = _ranged(int, 0, 65535)
_positive_int = _ranged(int, 1)
_non_negative_int = _ranged(int, 0)
_non_negative = _ranged(float, 0)
_seconds = _ranged(float, 0, above=True)
_max_line = _ranged(int, 16, unit=" bytes")


_lease = _ranged(float, 1, 3600)


def _cluster_name(text):
    """Names that go into Redis keys and log lines: short, no spaces."""
    if not re.fullmatch(r"[A-Za-z0-9_.:@-]{1,64}", text):
        raise argparse.ArgumentTypeError(
            "must be 1 to 64 characters from A-Z a-z 0-9 _ . : @ -, got %r" % text)
    return text


def _redis_url(text):
    from chatlib.cluster.redis_client import parse_url
    try:
        return parse_url(text, os.environ.get("REDIS_PASSWORD"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc))


def _listen(text):
    from chatlib.metrics import parse_listen
    try:
        return parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc))


def _default_port():
    env = os.environ.get("PORT")
    return _port(env) if env else DEFAULT_PORT


def program_name():
    """What the operator typed: ``broker.py`` or ``chat-server``, for usage
    lines and errors (``--version`` names the product, however it was
    started)."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if name and name != "-c" else PRODUCT


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show each default once: some help texts already say theirs."""

    def _get_help_string(self, action):
        if "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser(parser_class=argparse.ArgumentParser):
    methods = multiprocessing.get_all_start_methods()
    p = parser_class(
        prog=program_name(),
        description="Multi-process TCP chat server: one acceptor, N workers "
                    "running the client connections, one broker routing "
                    "between them. Connect with `nc HOST PORT`.",
        epilog="Example: %(prog)s --workers 4 --port 4000",
        formatter_class=_HelpFormatter)
    p.add_argument("-p", "--port", type=_port, default=None,
                   help="TCP port to listen on; 0 picks a free one "
                        "(default: $PORT if set, else %d)" % DEFAULT_PORT)
    p.add_argument("--host", default="0.0.0.0", help="address to listen on")
    p.add_argument("-w", "--workers", type=_positive_int,
                   default=os.cpu_count() or 1,
                   help="worker processes running client connections "
                        "(default: number of CPUs)")
    p.add_argument("-t", "--idle-timeout", type=_seconds, default=60.0,
                   help="seconds without a complete line before a client "
                        "gets ERR idle-timeout and is closed")
    p.add_argument("--max-clients", type=_positive_int, default=50000,
                   help="connections beyond this get ERR server-full")
    p.add_argument("--max-line", type=_max_line, default=4096,
                   help="longest accepted line in bytes, terminator included")
    p.add_argument("--max-pending", type=_positive_int, default=1 << 20,
                   help="bytes of unsent output a client may owe before it "
                        "gets ERR slow-consumer and is closed")
    p.add_argument("--login-timeout", type=_non_negative, default=30.0,
                   help="seconds a connection may take to log in before it "
                        "gets ERR login-timeout and is closed (0: no limit)")
    p.add_argument("--rate", type=_non_negative, default=1000.0,
                   help="flood control: lines per second a client may send on "
                        "average; over it the server reads it more slowly, and "
                        "cuts it with ERR flood after 10 s (0: no limit)")
    p.add_argument("--burst", type=_positive_int, default=2000,
                   help="flood control: lines a client may send at once "
                        "above --rate")
    p.add_argument("--max-per-ip", type=_non_negative_int, default=64,
                   help="connections from one address beyond this get "
                        "ERR too-many-connections (0: no limit)")
    p.add_argument("--heartbeat-timeout", type=_seconds, default=5.0,
                   help="seconds a process may go without a heartbeat before "
                        "it is considered hung, killed and replaced")
    p.add_argument("--start-method", choices=methods, default=None,
                   help="multiprocessing start method "
                        "(default: the platform's, here %s)"
                        % multiprocessing.get_start_method(allow_none=False))
    p.add_argument("--log-level", default="INFO", type=str.upper,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="log verbosity (any case)")
    p.add_argument("--log-file", default=None, metavar="PATH",
                   help="append logs to this file instead of stderr; SIGHUP "
                        "reopens it, for logrotate (default: stderr)")
    p.add_argument("--stats-interval", type=_non_negative, default=0.0, metavar="S",
                   help="log a statistics line every S seconds (0: off; "
                        "SIGUSR1 logs one at once)")
    o = p.add_argument_group(
        "operating it",
        "`%(prog)s ctl COMMAND` (same user, same host) talks to the running "
        "server over its control socket: `%(prog)s ctl help` lists the "
        "commands (users, kick, ban, mute, announce, stats, metrics...).")
    o.add_argument("--control", default=None, metavar="PATH",
                   help="the control socket, mode 0600 in a directory only this "
                        "user may write (default: $RUNTIME_DIRECTORY/PORT.sock under "
                        "systemd, else $XDG_RUNTIME_DIR/chat-server/PORT.sock, else "
                        "/tmp/chat-server-UID/PORT.sock); give ctl the same")
    o.add_argument("--state-dir", default=None, metavar="DIR",
                   help="where the bans, mutes and accounts are kept across restarts "
                        "(default: $STATE_DIRECTORY under systemd, else "
                        "$XDG_STATE_HOME/chat-server/PORT, else "
                        "~/.local/state/chat-server/PORT)")
    o.add_argument("--metrics", default=None, metavar="[HOST:]PORT", type=_listen,
                   help="serve the statistics at http://HOST:PORT/metrics in the "
                        "Prometheus text format; a port alone listens on loopback "
                        "(default: off)")
    a = p.add_argument_group(
        "accounts",
        "Registered names need their password: `LOGIN NAME PASSWORD`. Users "
        "register with `REGISTER PASSWORD`; the operator with `ctl account add "
        "NAME`. Without any account the chat is as open as ever.")
    a.add_argument("--closed", action="store_true",
                   help="only registered names may log in, and users cannot register "
                        "(default: open to every free name)")
    a.add_argument("--no-register", action="store_true",
                   help="users cannot register their names; the operator still can "
                        "(default: they can)")
    a.add_argument("--accounts-tls-only", action="store_true",
                   help="registered names log in, register and change passwords over "
                        "TLS only (ERR tls-required): a password sent in plaintext "
                        "can be read by anyone on the path (default: off)")
    c = p.add_argument_group(
        "cluster mode",
        "Several servers, each on its own host, form one chat through a shared "
        "Redis (>= 6.2) or Valkey. Without --redis the server is a single host, "
        "as always.")
    c.add_argument("--redis", default=None, metavar="URL", type=_redis_url,
                   help="join the cluster on this Redis: "
                        "redis://[[user]:password@]host[:port][/db] (rediss:// for "
                        "TLS, the certificate checked against the system's CAs or "
                        "$SSL_CERT_FILE); the password may also come from "
                        "$REDIS_PASSWORD (default: no cluster)")
    c.add_argument("--cluster", default="chat", type=_cluster_name, metavar="NAME",
                   help="prefix of every Redis key and stream, so that several "
                        "chats can share one Redis")
    c.add_argument("--node-id", default=None, type=_cluster_name, metavar="ID",
                   help="this node's name in the cluster, unique among live nodes "
                        "(default: host name and port)")
    c.add_argument("--node-lease", type=_lease, default=10.0, metavar="SECONDS",
                   help="a node that cannot renew its lease in Redis for this long "
                        "is taken for dead: the others announce its users gone, and "
                        "it closes their connections with ERR unavailable first")
    t = p.add_argument_group(
        "encrypted connections (TLS)",
        "With --tls-cert the server also listens on --tls-port for TLS clients "
        "(openssl s_client, ncat --ssl, socat OPENSSL:...), who share one chat "
        "with the plaintext ones; with --tls-only it listens on --tls-port "
        "alone. SIGHUP reloads the certificate and key: new connections get the "
        "new ones, open ones keep theirs; files that fail to load keep the old.")
    t.add_argument("--tls-cert", default=None, metavar="PEM",
                   help="the certificate chain, server certificate first "
                        "(certbot: fullchain.pem) (default: no TLS)")
    t.add_argument("--tls-key", default=None, metavar="PEM",
                   help="its private key, unencrypted (certbot: privkey.pem) "
                        "(default: in the --tls-cert file)")
    t.add_argument("--tls-port", type=_port, default=None, metavar="PORT",
                   help="TCP port for TLS clients; 0 picks a free one "
                        "(default: %d)" % DEFAULT_TLS_PORT)
    t.add_argument("--tls-only", action="store_true", default=None,
                   help="serve TLS clients only: no plaintext port (--port is "
                        "then not allowed) (default: both)")
    t.add_argument("--tls-handshake-timeout", type=_seconds, default=None, metavar="S",
                   help="seconds a TLS handshake may take before the connection is "
                        "dropped (default: %g)" % DEFAULT_TLS_HANDSHAKE_TIMEOUT)
    t.add_argument("--max-tls-relays", type=_non_negative_int, default=16, metavar="N",
                   help="an upgrade leaves each old worker with TLS users running, "
                        "as the relay of their sessions, until they leave; one that "
                        "could make more than N such processes is refused")
    p.add_argument("--version", action="version",
                   version="%s %s" % (PRODUCT, __version__))
    return p


# What the server listens on, and where its state and control live: an
# upgrade (``ctl upgrade OPTIONS``) cannot change them, a restart can.
FIXED_BY_UPGRADE = ("host", "port", "tls_port", "tls_cert", "tls_key", "tls_only", "redis",
                    "cluster", "node_id", "control", "state_dir", "metrics", "log_file",
                    "start_method")


class OptionError(ValueError):
    """A command line that does not parse, for a caller that must not exit."""


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message):
        raise OptionError(message)

    def exit(self, status=0, message=None):     # --help, --version
        raise OptionError("not an option of a running server")

    def _print_message(self, message, file=None):
        """The help goes nowhere: the caller is the server, not a terminal."""


def upgraded(config, words):
    """The configuration an upgrade with options ``words`` runs with: the
    command line the server was started with, then ``words``, which win.
    OptionError: they do not parse, or change one of FIXED_BY_UPGRADE."""
    before = parse_args(config.argv, raising=True)     # as the server parsed it
    after = parse_args(config.argv + list(words), raising=True)
    for name in FIXED_BY_UPGRADE:
        if getattr(before, name, None) != getattr(after, name, None):
            raise OptionError("--%s changes what the server listens on or keeps: "
                              "that takes a restart" % name.replace("_", "-"))
    new = argparse.Namespace(**vars(config))
    for name, value in vars(after).items():
        if name not in FIXED_BY_UPGRADE:
            setattr(new, name, value)
    new.upgraded = True             # for completed(), in the new processes
    return new


def completed(config):
    """``config`` as this code knows it: an upgrade hands the new code the
    options the old one parsed; an option new since then is at its default."""
    for name, value in vars(build_parser().parse_args([])).items():
        if not hasattr(config, name):
            setattr(config, name, value)
    return config


def parse_args(argv=None, raising=False):
    """The options; ``raising``: OptionError for a bad one, rather than a
    usage message and exit status 2 (``ctl upgrade`` OPTIONS)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_RaisingParser if raising else argparse.ArgumentParser)
    args = parser.parse_args(argv)
    args.argv = argv
    _check_tls(args, parser.error)
    if args.port is None:
        try:
            args.port = _default_port()
        except (ValueError, argparse.ArgumentTypeError):
            parser.error("PORT environment variable is not a valid port")
    _check_log_file(args, parser.error)
    return args


def _check_log_file(args, error):
    """Every process appends to --log-file: one that cannot be opened (no
    such directory, a directory, no permission) stops the server here, with
    one line, rather than with the main process's traceback."""
    if args.log_file is None:
        return
    try:
        with open(args.log_file, "a"):
            pass
    except OSError as exc:
        error("--log-file %s: %s" % (args.log_file, exc.strerror or exc))


def _check_tls(args, error):
    """The TLS options agree, and the certificate and key load: a bad one
    stops the server here, before anything listens."""
    if args.tls_cert is None:
        given = [option for option, value in (
            ("--tls-key", args.tls_key), ("--tls-port", args.tls_port),
            ("--tls-only", args.tls_only),
            ("--tls-handshake-timeout", args.tls_handshake_timeout)) if value is not None]
        if given:
            error("%s needs --tls-cert" % given[0])
    else:
        if args.tls_only and args.port is not None:
            error("--tls-only serves no plaintext port: drop --port")
        if args.tls_port is None:
            args.tls_port = DEFAULT_TLS_PORT
        if not args.tls_only and args.tls_port != 0 and args.tls_port == (
                args.port if args.port is not None else _default_port_or_none()):
            error("--tls-port %d is the plaintext port too: give another" % args.tls_port)
        from chatlib.tls import load_problem
        context, problem = load_problem(args.tls_cert, args.tls_key)
        if problem:
            error(problem)
    args.tls_only = bool(args.tls_only)
    if args.tls_handshake_timeout is None:
        args.tls_handshake_timeout = DEFAULT_TLS_HANDSHAKE_TIMEOUT


def _default_port_or_none():
    try:
        return _default_port()
    except (ValueError, argparse.ArgumentTypeError):
        return None
