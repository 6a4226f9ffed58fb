"""The supervisor: the one place that starts, watches, restarts and stops processes.

Modelled on gunicorn's arbiter: signal handlers only record the signal; the
main loop acts on it. The loop sleeps in one ``multiprocessing.connection.wait``
over every child's sentinel (a death), every child's reports pipe (ready,
heartbeats) and the signal wake-up socket.

What it owns:

* the listening sockets, so that they survive the acceptor, and connection
  attempts wait in the backlog while an acceptor is replaced;
* every pipe between children: it creates them, hands each end to its process
  (as a start argument, or later with ``send_handle`` over its orders pipe),
  and closes its own copies;
* the operator's control socket (:mod:`chatlib.control`) and the metrics
  endpoint (``--metrics``): it answers what it knows from the heartbeats
  (``stats``, ``metrics``), does what a signal would (``reload``) and
  relays the rest to the broker and the workers (:mod:`chatlib.control.relay`);
* the chat's bans and mutes as last saved, loaded at start (a file that does
  not parse stops the server) and kept up to date by the broker, which owns
  them: for the acceptor, and for a broker that replaces one that died.

When a child dies (or misses heartbeats and is killed) it is replaced, and
the survivors are re-wired: a new worker's pipes go to the broker and the
acceptor; a new broker gets a pipe to every worker; a new acceptor gets a
pipe to every worker. A child that keeps dying right after start stops the
server instead of looping forever.

Nothing relies on state inherited through ``fork``: each child gets what it
needs as arguments, so ``fork``, ``spawn`` and ``forkserver`` behave the same.
Nor does a child keep what ``fork`` gives it besides: every descriptor the
supervisor holds (the listening sockets, its ends of every child's pipes,
the children's sentinels, its signal wake-up socket) is closed in a forked
child at once (``inherited_by_fork``), so that only the supervisor and the
acceptor hold a listening socket, and nobody holds a pipe end it does not use.
"""

import contextlib
import logging
import multiprocessing
import os
import resource
import secrets
import shlex
import signal
import socket
import time
from collections import Counter
from functools import partial
from multiprocessing import resource_tracker, util
from multiprocessing.connection import wait
from multiprocessing.reduction import send_handle

from chatlib import __version__, logs, statefile
from chatlib.accounts import ACCOUNTS_FILE, Accounts
from chatlib.acceptor import Acceptor
from chatlib.config import OptionError, upgraded
from chatlib.control import commands
from chatlib.control.relay import Relay
from chatlib.control.server import ControlError, ControlServer, default_socket_path
from chatlib.control.users import user_line, utc
from chatlib.handoff import PLAIN, TLS, inherited_by_fork
from chatlib.metrics import MetricsEndpoint, render
from chatlib.moderation import BANS_FILE, Moderation
from chatlib.service import run_service
from chatlib.stats import StatsReport, snapshot
from chatlib.upgrade import probe

log = logging.getLogger("supervisor")

READY_TIMEOUT = 30.0          # seconds for every process to come up
STOP_GRACE = 4.0              # seconds for children to stop before SIGKILL
RESTART_WINDOW = 1.0          # a child that dies sooner than this after start...
MAX_QUICK_DEATHS = 5          # ...this many times in a row stops the server
LOOP_TIMEOUT = 0.25
# A turn of the watch loop sleeps at most LOOP_TIMEOUT. One longer than that
# by a quarter of --heartbeat-timeout (at most PAUSE_NOTICED seconds) means
# the supervisor was not running: more than a busy machine delays it, and
# less than a child can be blamed for, whose last heartbeat may already be a
# quarter of the timeout old (chatlib.service sends four per timeout).
PAUSE_NOTICED = 1.0
WRITE_POLL = 0.01             # the loop's sleep while the control socket has output waiting
SWITCH_TIMEOUT = 5.0          # an upgrade's old processes get this long to hand over


class Upgrade:
    """One ``ctl upgrade`` under way (chatlib.upgrade): who asked, with what
    options, and the processes on either side of the switch."""

    def __init__(self, reply, config, probing):
        self.reply = reply            # reply(lines, error), once
        self.config = config          # the new processes'
        self.probe = probing          # the probe, until it has answered
        self.started = time.monotonic()
        self.phase = "probe"          # probe, start, drain, move, finish
        self.deadline = self.started + probe.TIMEOUT
        self.version = None           # the new code's, as the probe found it
        self.successors = {}          # (role, slot) -> Child: the new processes
        self.old = {}                 # (role, slot) -> Child: the ones they replace
        self.adoptions = {}           # (role, slot) of a successor -> hand-overs it awaits
        self.ready_at = None          # when the new processes were ready (drain)
        self.paused = None            # when lines between workers began to wait,
        self.resumed = None           # and when they went on (begin)

    def children(self):
        return list(self.successors.values()) + list(self.old.values())

    @property
    def switching(self):
        """Between the old processes letting go and the new ones taking over."""
        return self.phase in ("quiesce", "drain", "move")


class Child:
    """One running process and what the supervisor knows about it."""

    def __init__(self, role, slot, process, orders, reports):
        self.role = role
        self.slot = slot
        self.process = process
        self.orders = orders          # our end: orders, and descriptors, to it
        self.reports = reports        # our end: ready and heartbeats, from it
        self.started = time.monotonic()
        self.last_heartbeat = self.started    # when it last reported anything
        self.ready = False
        self.info = None
        self.code = None              # {"version", "state"}: what it runs, from its ready
        self.quiet = False            # an upgrade: an old worker taking no more connections,
        self.drained = False          # one ready to hand over,
        self.adopted = None           # a new one that took its predecessor's (count),
        self.relaying = 0             # an old one still relaying TLS connections

    @property
    def name(self):
        return self.role if self.slot is None else "%s-%d" % (self.role, self.slot)

    def close_in_fork(self):
        """In a child forked later: its sentinel pipe's ends, which the
        supervisor holds (the write end would keep this child from seeing
        the supervisor die). Python's own finalizer for them does not run
        in a forked child; the descriptors are in its arguments."""
        finalizer = getattr(getattr(self.process, "_popen", None), "finalizer", None)
        for fd in getattr(finalizer, "_args", None) or (self.process.sentinel,):
            try:
                os.close(fd)
            except (OSError, TypeError):
                pass

    def order(self, *message, handles=()):
        """Send an order, then the descriptors of ``handles`` for the child to adopt."""
        try:
            self.orders.send(message)
            for handle in handles:
                send_handle(self.orders, handle.fileno(), self.process.pid)
        except (OSError, RuntimeError):   # RuntimeError: macOS had no acknowledgement
            pass              # it is dying; its sentinel will tell us


def raise_nofile_limit():
    """Thousands of clients need thousands of descriptors: use the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > 1 << 20:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# The signals the main process acts on (see handle_signals). The children
# never see them: the supervisor alone decides, and tells them by pipe.
OPERATOR_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1}


@contextlib.contextmanager
def operator_signals_deferred(start_method):
    """Start processes with the operator's signals blocked, so that they
    inherit them blocked, whatever the start method.

    ``systemctl kill -s HUP`` or ``-s USR1`` without ``--kill-who=main``,
    ``KillMode=control-group``, ``kill -- -PGID``, Ctrl-C or a
    terminal hang-up signal every process, not only the main one. Under
    ``spawn`` and ``forkserver`` the children and multiprocessing's helpers
    (the forkserver, the resource tracker) are fresh interpreters in which
    SIGTERM, SIGHUP and SIGUSR1 kill: clients would be dropped without
    ``ERR server-shutdown``, and a dead forkserver takes all its children
    with it, for they watch it as their parent. (Under ``fork`` the children
    would run a copy of our handlers instead, and ignore them.) A signal
    blocked across ``fork`` and ``exec`` stays blocked, so none of them sees
    it; ours waits until the block is lifted, nothing lost. A child that must
    go gets SIGKILL, as the supervisor does.

    The resource tracker, when it starts one, unblocks SIGINT and SIGTERM in
    our thread: so it is started first, and the signals blocked again.
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, OPERATOR_SIGNALS)
    try:
        if start_method != "fork":
            resource_tracker.ensure_running()
            signal.pthread_sigmask(signal.SIG_BLOCK, OPERATOR_SIGNALS)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class Supervisor:
    def __init__(self, config, broker, worker):
        """``broker`` and ``worker``: the classes of those processes, which
        the application hands over (the library imports nothing from it)."""
        self.config = config
        self.broker_class = broker
        self.worker_class = worker
        self.ctx = multiprocessing.get_context(config.start_method)
        self.children = {}            # (role, slot) -> Child
        self.signals = []
        self.stopping = False
        self.quick_deaths = {}        # (role, slot) -> deaths soon after start, in a row
        self.restarts = {}            # (role, slot) -> times replaced
        self.started = time.monotonic()
        self.started_at = time.time()
        self.stats = StatsReport()
        self.next_stats = float("inf")
        self.last_turn = None         # when the watch loop last checked heartbeats
        self.longest_turn = LOOP_TIMEOUT + min(PAUSE_NOTICED, config.heartbeat_timeout / 4)
        self.silence_counted_from = float("-inf")  # after the supervisor's own pause
        self.listener = None          # the first of:
        self.listeners = []           # [(socket, PLAIN or TLS)]
        self.moderation = Moderation()  # the chat's bans and mutes, as last saved
        self.accounts = Accounts()    # and its accounts
        self.control = None           # chatlib.control.server.ControlServer
        self.metrics = None           # chatlib.metrics.MetricsEndpoint, with --metrics
        self.relay = Relay()          # operator commands awaiting other processes
        self.upgrade = None           # the Upgrade under way
        self.version = __version__    # the children's code, and since when
        self.version_since = time.time()
        self.upgrades = 0
        self.tls_relays = 0           # old workers that stayed on as TLS relays, ever
        self.retired_accepted = 0     # what acceptors replaced by an upgrade counted:
        self.retired_refused = Counter()   # the totals go on from there

    # -- the whole life -------------------------------------------------------

    def run(self):
        cfg = self.config
        logs.setup("main", cfg.log_level, cfg.log_file)
        nofile = raise_nofile_limit()
        ports = [] if cfg.tls_only else [(cfg.port, PLAIN)]
        if cfg.tls_cert:
            ports.append((cfg.tls_port, TLS))
        for port, kind in ports:
            try:
                self.listeners.append((inherited_by_fork(self.listen(port)), kind))
            except OSError as exc:
                log.error("cannot listen on %s:%d: %s", cfg.host, port, exc.strerror or exc)
                return 1
        self.listener = self.listeners[0][0]
        if cfg.tls_cert:
            from chatlib.tls import fingerprint
            log.info("TLS certificate %s (sha256 %s)", cfg.tls_cert, fingerprint(cfg.tls_cert))
        if cfg.redis is not None:
            self.name_node()
        wake_r, wake_w = map(inherited_by_fork, socket.socketpair())
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        signal.set_wakeup_fd(wake_w.fileno())
        for sig in OPERATOR_SIGNALS:
            signal.signal(sig, self.record_signal)
        self.wake = wake_r
        log.info("starting: %d workers, start method %s, open-file limit %d",
                 cfg.workers, self.ctx.get_start_method(), nofile)
        try:
            if not self.load_state() or not self.open_endpoints():
                return 2
            self.start_all()
            if self.wait_ready():
                where = self.addresses()
                log.info("listening on %s", where)
                notify("READY=1\nSTATUS=listening on %s" % where)
                if cfg.stats_interval:
                    self.next_stats = time.monotonic() + cfg.stats_interval
                self.watch()
            return self.exit_status if self.failed else 0
        finally:
            self.shutdown()

    failed = False
    exit_status = 1               # when failed: 2 for what no restart can cure

    def name_node(self):
        """Cluster mode: this node's id (default: host name and port) and a
        token for this run of it, which its brokers, restarted or not, share:
        a node that finds its id leased with another token is a duplicate."""
        cfg = self.config
        if cfg.node_id is None:
            cfg.node_id = "%s:%d" % (socket.gethostname(), self.listener.getsockname()[1])
        cfg.node_token = secrets.token_hex(8)
        log.info("cluster %r on %s, node %s", cfg.cluster, cfg.redis, cfg.node_id)

    def load_state(self):
        """The bans and mutes, and the accounts, saved in the state
        directory (by default one per port, so that two servers on one
        host keep their own). A file that does not parse stops the server,
        as a bad option does."""
        cfg = self.config
        if cfg.state_dir is None:
            cfg.state_dir = statefile.default_state_dir(self.listener.getsockname()[1])
        for name, kind in ((BANS_FILE, Moderation), (ACCOUNTS_FILE, Accounts)):
            path = os.path.join(cfg.state_dir, name)
            try:
                saved = statefile.load_json(path)
            except ValueError as exc:
                log.error("cannot start: %s", exc)
                return False
            if saved is None:
                continue
            try:
                state = kind.from_json(saved)
            except ValueError as exc:
                log.error("cannot start: %s: %s", path, exc)
                return False
            if kind is Moderation:
                self.moderation = state
            else:
                self.accounts = state
            log.info("%s from %s", state, path)
        return True

    def open_endpoints(self):
        """The control socket (by default one per port), and with
        ``--metrics`` the metrics endpoint."""
        cfg = self.config
        path = cfg.control or default_socket_path(self.listener.getsockname()[1])
        self.control = ControlServer(path, self.on_command, log)
        try:
            self.control.open()
        except ControlError as exc:
            log.error("cannot start: %s", exc)
            return False
        log.info("control socket %s", path)
        if cfg.metrics:
            host, port = cfg.metrics
            self.metrics = MetricsEndpoint(host, port, lambda: render(self.snapshot()), log)
            try:
                self.metrics.open()
            except OSError as exc:
                log.error("cannot serve metrics on %s:%d: %s", host, port, exc.strerror or exc)
                return False
            log.info("metrics at http://%s:%d/metrics" % self.metrics.address[:2])
        return True

    def addresses(self):
        """``HOST:PORT``, ``HOST:PORT and HOST:PORT (TLS)``, or ``HOST:PORT (TLS)``."""
        return " and ".join("%s:%d%s" % (sock.getsockname()[:2] + (" (TLS)" if kind == TLS else "",))
                            for sock, kind in self.listeners)

    def listen(self, port):
        cfg = self.config
        family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Chat lines are small and must go at once. Accepted sockets inherit
        # this (Linux, macOS, the BSDs): no setsockopt per connection.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((cfg.host, port))
        sock.listen(socket.SOMAXCONN if socket.SOMAXCONN > 1024 else 1024)
        return sock

    def record_signal(self, signum, frame):
        self.signals.append(signum)

    # -- starting -------------------------------------------------------------

    def spawn(self, cls, slot, *args, config=None, into=None):
        """Start ``cls`` in a new process, as ``slot`` of its role in
        ``into`` (default: the running children); ``config``: an upgrade's."""
        config = config or self.config
        into = self.children if into is None else into
        orders, their_orders = self.ctx.Pipe()       # a socket pair: can carry descriptors
        reports, their_reports = self.ctx.Pipe(duplex=False)
        inherited_by_fork(orders)
        inherited_by_fork(reports)
        pipes = (their_orders, their_reports)
        role = cls.role
        name = role if slot is None else "%s-%d" % (role, slot)
        if slot is None:
            target_args = (cls, config, pipes) + args
        else:
            target_args = (cls, config, pipes, slot) + args
        process = self.ctx.Process(target=run_service, args=target_args, name=name)
        with operator_signals_deferred(self.ctx.get_start_method()):
            process.start()
        their_orders.close()
        their_reports.close()
        child = Child(role, slot, process, orders, reports)
        util.register_after_fork(child, Child.close_in_fork)
        into[(role, slot)] = child
        log.info("started %s (pid %d)", name, process.pid)
        return child

    def start_all(self):
        self.start_broker()
        for k in range(self.config.workers):
            self.start_worker(k)
        self.start_acceptor()

    # Children start with no peers: every pipe between two children is made
    # here and handed to both ends as an order, at start-up as after a restart.

    def start_worker(self, slot):
        self.spawn(self.worker_class, slot)
        self.connect(slot, "broker")
        self.connect(slot, "acceptor")

    def start_broker(self):
        self.spawn(self.broker_class, None, self.worker_slots(), self.moderation, self.accounts)
        for slot in self.worker_slots():
            self.connect(slot, "broker")

    def start_acceptor(self):
        # Its own copies: in a forked child the supervisor's are closed.
        listeners = [(sock.dup(), kind) for sock, kind in self.listeners]
        try:
            self.spawn(Acceptor, None, listeners, len(self.worker_slots()), self.moderation)
        finally:
            for sock, _ in listeners:
                sock.close()
        for slot in self.worker_slots():
            self.connect(slot, "acceptor")

    def worker_slots(self):
        return sorted(slot for role, slot in self.children if role == "worker")

    def connect(self, slot, role):
        """New pipes between worker ``slot`` and the broker (the link) or the
        acceptor (hand-offs one way, notes the other: see chatlib.acceptor)."""
        peer = self.children.get((role, None))
        worker = self.children.get(("worker", slot))
        if peer is None or worker is None:
            return
        pipes = [self.ctx.Pipe() for _ in range(1 if role == "broker" else 2)]
        peer.order("attach", slot, handles=[peer_end for peer_end, _ in pipes])
        worker.order("link" if role == "broker" else "handoff",
                     handles=[worker_end for _, worker_end in pipes])
        for ends in pipes:
            for end in ends:
                end.close()

    def disconnect(self, slot):
        """Worker ``slot`` is gone: the broker and the acceptor forget it."""
        for role in ("broker", "acceptor"):
            peer = self.children.get((role, None))
            if peer is not None:
                peer.order("detach", slot)

    def wait_ready(self):
        deadline = time.monotonic() + READY_TIMEOUT
        while not all(c.ready for c in self.children.values()):
            # A cluster node's broker waits for Redis as long as it takes.
            late = time.monotonic() > deadline and not self.only_redis_awaited()
            if self.signals or late:
                if not self.signals:
                    log.error("processes did not start within %.0f s", READY_TIMEOUT)
                    self.failed = True
                return False
            self.poll(LOOP_TIMEOUT)
            if self.failed:
                return False
        return True

    def only_redis_awaited(self):
        return self.config.redis is not None and all(
            c.ready for c in self.children.values() if c.role != "broker")

    # -- watching -------------------------------------------------------------

    def watch(self):
        self.last_turn = time.monotonic()
        while not self.failed:
            self.poll(LOOP_TIMEOUT)
            if self.handle_signals():
                return
            now = time.monotonic()
            self.notice_own_pause(now)
            self.check_heartbeats(now)
            if now >= self.next_stats:
                self.next_stats += self.config.stats_interval
                self.log_stats()

    def everyone(self):
        """Every child: the running ones, and those of an upgrade under way."""
        children = list(self.children.values())
        return children + self.upgrade.children() if self.upgrade else children

    def poll(self, timeout):
        by_reports = {c.reports: c for c in self.everyone()}
        by_sentinel = {c.process.sentinel: c for c in self.everyone()}
        endpoints = [e for e in (self.control, self.metrics) if e is not None]
        by_endpoint = {obj: e for e in endpoints for obj in e.waitables()}
        if any(e.writing for e in endpoints):
            timeout = min(timeout, WRITE_POLL)
        probing = self.upgrade.probe if self.upgrade else None
        if self.upgrade is not None:
            timeout = min(timeout, WRITE_POLL)      # its steps are checked every turn
        waitables = list(by_reports) + list(by_sentinel) + list(by_endpoint) + [self.wake]
        for obj in wait(waitables + ([probing.stdout] if probing else []), timeout):
            if probing is not None and obj is probing.stdout:
                self.on_probe()
            elif obj is self.wake:
                try:
                    self.wake.recv(512)
                except OSError:
                    pass
            elif obj in by_reports:
                self.on_message(by_reports[obj])
            elif obj in by_endpoint:
                by_endpoint[obj].on_ready(obj)
            else:
                self.on_death(by_sentinel[obj])
        now = time.monotonic()
        self.relay.expire(now)
        if self.upgrade is not None:
            self.advance_upgrade(now)
        if self.metrics is not None:
            self.metrics.tick(now)
        for endpoint in endpoints:
            endpoint.flush()

    def on_message(self, child):
        try:
            message = child.reports.recv()
        except (EOFError, OSError):
            return                    # it died; the sentinel says so
        # When it was sent (one monotonic clock per host): a heartbeat read
        # late, after a pause of the supervisor's, is not a fresh one.
        child.last_heartbeat = message[2] if message[0] == "heartbeat" else time.monotonic()
        if message[0] == "ready":
            child.ready = True
            child.code = message[1] if len(message) > 1 else None
        elif message[0] == "quiet":         # an upgrade's steps (chatlib.upgrade)
            child.quiet = True
        elif message[0] == "drained":
            child.drained = True
        elif message[0] == "adopted":      # (connections, of which relayed)
            moved, relayed = child.adopted or (0, 0)
            child.adopted = (moved + message[1], relayed + message[2])
            if self.upgrade is not None:
                key = (child.role, child.slot)
                self.upgrade.adoptions[key] = self.upgrade.adoptions.get(key, 1) - 1
        elif message[0] == "relaying":
            child.relaying = message[1]
        elif message[0] == "fatal":
            log.error("%s", message[1])
            self.failed = True
            self.exit_status = 2
        elif message[0] == "heartbeat":
            child.info = message[1]
        elif message[0] == "answer":        # to an operator's command
            self.relay.answered(message[1], (child.role, child.slot), message[2:])
        elif message[0] == "accounts":      # the broker changed them
            self.accounts = message[1]
        elif message[0] == "moderation":    # the broker changed the bans and mutes
            self.moderation = message[1]
            acceptor = self.children.get(("acceptor", None))
            if acceptor is not None:
                acceptor.order("moderation", self.moderation)

    def handle_signals(self):
        """Act on the recorded signals; True when the server must stop."""
        stop = False
        while self.signals:
            signum = self.signals.pop(0)
            if signum in (signal.SIGTERM, signal.SIGINT):
                log.info("received %s: shutting down", signal.Signals(signum).name)
                stop = True
            elif signum == signal.SIGHUP:
                self.handle_hup()
            elif signum == signal.SIGUSR1:
                self.log_stats()
                self.log_processes()
        return stop

    def handle_hup(self, by="received SIGHUP"):
        """Reopen the log file (logrotate) and reload the TLS certificate
        (certbot), whichever the server has; the log says which."""
        log_file = self.config.log_file
        tls_cert = self.config.tls_cert
        if log_file:
            logs.reopen()
            for child in self.children.values():
                child.order("reopen-log")
        actions = [what for what, has in (("log file reopened", log_file),
                                       ("reloading the TLS certificate", tls_cert)) if has]
        log.info("%s: %s", by, "; ".join(actions) or
                 "nothing to do (logging to stderr, no TLS certificate)")
        if tls_cert:
            self.reload_tls()

    def reload_tls(self):
        """SIGHUP: if the certificate and key load, the workers load them
        (new connections get them; open ones keep theirs); if not, all keep
        the ones they have."""
        from chatlib.tls import fingerprint, load_problem
        cfg = self.config
        context, problem = load_problem(cfg.tls_cert, cfg.tls_key)
        if problem:
            log.error("TLS certificate not reloaded, the previous one stays: %s", problem)
            return
        for child in self.children.values():
            if child.role == "worker":
                child.order("tls-reload")
        log.info("TLS certificate reloaded: %s (sha256 %s)", cfg.tls_cert,
                 fingerprint(cfg.tls_cert))

    # -- the operator's commands (chatlib.control) ---------------------------

    def on_command(self, line, reply):
        """One command from the control socket: ``reply(lines, error)``
        answers it, now or once the processes asked have answered."""
        name, rest = commands.split(line)
        if not commands.known(name):
            reply([], "unknown-command %s (try help)" % name)
            return
        if self.upgrade is not None and self.upgrade.switching \
                and name not in commands.ANSWERED_BY_MAIN:
            reply([], "busy an upgrade is switching processes: try again in a moment")
            return
        handler = getattr(self, "command_" + name, None)
        if handler is not None:
            handler(rest, reply)
        else:
            self.ask_broker(name, rest, reply)

    def command_help(self, rest, reply):
        reply(commands.help_lines(), None)

    def command_stats(self, rest, reply):
        reply(["%s %s" % pair for pair in self.stats.figures(*self.figures_now())], None)

    def command_metrics(self, rest, reply):
        reply(render(self.snapshot()).splitlines(), None)

    def command_reload(self, rest, reply):
        self.handle_hup(by="operator asked to reload")
        reply([], None)

    def command_users(self, rest, reply):
        """Every worker's users, and the broker's list of the other nodes'."""
        workers = [c for c in self.children.values() if c.role == "worker"]
        broker = self.children.get(("broker", None))
        asked = [c for c in workers + [broker] if c is not None]
        node = self.config.node_id or socket.gethostname()

        def finish(parts, complete):
            rows = []
            for key, part in parts.items():
                rows.extend(part[0])
            rows.sort(key=lambda row: row.stamp)
            error = None if complete else "partial some processes did not answer in time"
            return [user_line(row, node) for row in rows], error
        request = self.relay.ask([(c.role, c.slot) for c in asked], reply, finish,
                                 time.monotonic())
        for child in asked:
            if child.role == "worker":
                child.order("users", request)
            else:
                child.order("control", request, "users", rest)

    def ask_broker(self, name, rest, reply):
        """A command the broker runs (kick, ban, mute, announce...)."""
        broker = self.children.get(("broker", None))
        if broker is None or not broker.ready:
            reply([], "unavailable the broker is restarting: try again")
            return

        def finish(parts, complete):
            if not complete:
                return [], "unavailable the broker did not answer"
            lines, error = parts[("broker", None)]
            return lines, error
        if name in ("ban", "unban"):
            reply = partial(self.when_acceptor_has_it, reply)
        request = self.relay.ask([("broker", None)], reply, finish, time.monotonic())
        broker.order("control", request, name, rest)

    def when_acceptor_has_it(self, reply, lines, error):
        """A ban's OK waits until the acceptor refuses what it bans: the
        acceptor answers a sync once it has read every order before it,
        the bans among them."""
        acceptor = self.children.get(("acceptor", None))
        if error is not None or acceptor is None:
            reply(lines, error)
            return
        request = self.relay.ask([("acceptor", None)], reply,
                                 lambda parts, complete: (lines, None), time.monotonic())
        acceptor.order("sync", request)

    def reporting(self):
        """The children whose figures are the server's: the running ones
        and, while an upgrade switches, the old ones until the new take
        over (the new ones count on from their predecessors' figures)."""
        up = self.upgrade
        if up is not None and up.switching:
            return {(c.role, c.slot): c for c in list(self.children.values()) +
                    list(up.old.values())}
        return self.children

    def figures_now(self):
        """(the workers' last figures, users, the cluster's, TLS connections
        relayed by old workers: None without TLS)."""
        broker = self.reporting().get(("broker", None))
        info = (broker.info or {}) if broker else {}
        relayed = sum((c.info or {}).get("relayed", c.relaying) for c in self.children.values()
                      if c.role == "tls-relay") if self.config.tls_cert else None
        return self.workers_info(), info.get("users", 0), info.get("cluster"), relayed

    def snapshot(self):
        """Every figure of this node, for ``metrics`` (chatlib.metrics)."""
        acceptor = self.reporting().get(("acceptor", None))
        counted = (acceptor.info if acceptor else None) or {}
        refused = Counter(self.retired_refused)
        refused.update(counted.get("refused", {}))
        counted = {"accepted": counted.get("accepted", 0) + self.retired_accepted,
                   "refused": dict(refused)}
        restarts = {}
        for (role, _), count in self.restarts.items():
            restarts[role] = restarts.get(role, 0) + count
        workers, users, cluster, relayed = self.figures_now()
        return snapshot(workers, counted, users, cluster, restarts,
                        time.monotonic() - self.started, self.upgrades, relayed)

    def workers_info(self):
        return {c.slot: c.info or {} for c in self.reporting().values() if c.role == "worker"}

    def log_stats(self):
        workers, users, cluster, relayed = self.figures_now()
        log.info("%s", self.stats.line(workers, users, cluster, relayed))
        notify("STATUS=%d clients, %d users" % (StatsReport.clients(workers), users))

    def log_processes(self):
        now = time.monotonic()
        log.info("process main pid=%d uptime=%.0fs", multiprocessing.current_process().pid,
                 now - self.started)
        for key in sorted(self.children, key=lambda k: (k[0], k[1] if k[1] is not None else -1)):
            child = self.children[key]
            log.info("process %s pid=%d uptime=%.0fs restarts=%d", child.name,
                     child.process.pid, now - child.started, self.restarts.get(key, 0))

    def on_death(self, child):
        key = (child.role, child.slot)
        if self.upgrade is not None and child in self.upgrade.children():
            self.upgrade_death(child)
            return
        if self.children.get(key) is not child:
            return
        how = reap(child)
        del self.children[key]
        self.relay.gone(key)
        if child.role == "tls-relay":
            log.info("%s (pid %d) %s: its last TLS user has left", child.name,
                     child.process.pid, how)
            return
        if self.stopping or self.failed:
            return
        log.error("%s (pid %d) %s", child.name, child.process.pid, how)
        if not child.ready or time.monotonic() - child.started < RESTART_WINDOW:
            self.quick_deaths[key] = self.quick_deaths.get(key, 0) + 1
        else:
            self.quick_deaths[key] = 0
        if self.quick_deaths[key] >= MAX_QUICK_DEATHS:
            log.error("%s keeps dying at start-up; giving up", child.name)
            self.failed = True
            return
        self.restarts[key] = self.restarts.get(key, 0) + 1
        if child.role == "worker":
            self.disconnect(child.slot)
            self.start_worker(child.slot)
        elif child.role == "broker":
            self.start_broker()
        else:
            self.start_acceptor()

    def notice_own_pause(self, now):
        """A turn far longer than the loop sleeps: the supervisor itself was
        not running (Ctrl-Z, SIGSTOP, ``systemctl freeze``, a paused virtual
        machine), its children most likely with it. Whichever of them runs
        first after it, their silence meanwhile is nobody's fault: it
        counts from now."""
        gap = now - self.last_turn
        self.last_turn = now
        if gap > self.longest_turn:
            self.silence_counted_from = now
            log.warning("the supervisor did not run for %.1f s (stopped or suspended): "
                        "heartbeats are counted from now", gap)

    def check_heartbeats(self, now):
        """A child whose loop has stopped (hung, or SIGSTOP) is killed; its
        death is then handled like any other."""
        limit = now - self.config.heartbeat_timeout
        for child in list(self.children.values()):
            if max(child.last_heartbeat, self.silence_counted_from) < limit \
                    and child.process.is_alive():
                log.error("%s (pid %d) missed its heartbeats for %.1f s; killing it",
                          child.name, child.process.pid, now - child.last_heartbeat)
                child.process.kill()
                child.last_heartbeat = float("inf")   # once is enough

    # -- the upgrade (chatlib.upgrade: the steps and why) ----------------------

    def command_upgrade(self, rest, reply):
        if self.upgrade is not None:
            reply([], "busy an upgrade is under way")
            return
        if not all(c.ready for c in self.children.values()):
            reply([], "busy a process is starting: try again")
            return
        try:
            words = shlex.split(rest)
            config = upgraded(self.config, words)
        except (OptionError, ValueError) as exc:
            reply([], "refused %s" % exc)
            return
        relays = len([c for c in self.children.values() if c.role == "tls-relay"])
        if config.tls_cert and relays + len(self.worker_slots()) > config.max_tls_relays:
            reason = ("%d TLS relays run, and each worker could add one: over --max-tls-relays "
                      "%d (wait for their users to leave, or raise it: ctl upgrade "
                      "--max-tls-relays N)" % (relays, config.max_tls_relays))
            log.error("upgrade refused: %s; the running processes carry on", reason)
            reply([], "upgrade-failed " + reason)
            return
        modules = [self.worker_class.__module__, self.broker_class.__module__]
        if config.tls_cert:
            modules.append("chatlib.tls")
        if config.redis is not None:
            modules.append("chatlib.cluster.node")
        self.upgrade = Upgrade(reply, config, probe.start(modules))
        notify("RELOADING=1\nMONOTONIC_USEC=%d" % (time.monotonic_ns() // 1000))
        changed = [w for w in words if w.startswith("-")]   # names only: values may be secret
        log.info("upgrade: asked by the operator%s; loading the code on disk",
                 " (%s)" % " ".join(changed) if changed else "")

    def command_version(self, rest, reply):
        lines = ["version %s" % self.version, "since %s" % utc(self.version_since),
                 "upgrades %d" % self.upgrades,
                 "main pid %d since %s" % (os.getpid(), utc(self.started_at))]
        relays = [c for c in self.children.values() if c.role == "tls-relay"]
        if relays:
            lines.append("relayed %d TLS connections in %d old processes" % (
                self.figures_now()[3], len(relays)))
        reply(lines, None)

    def on_probe(self):
        """The new code imported (or not): start the new processes beside
        the running ones, with a fresh interpreter each (``fork`` and
        ``forkserver`` would copy the code this process loaded long ago)."""
        up = self.upgrade
        found, problem = probe.outcome(up.probe)
        up.probe = None
        if problem:
            self.refuse_upgrade("the new code does not start: %s" % problem)
            return
        running = {(c.code or {}).get("state", 1) for c in self.children.values()
                   if c.role == "worker"}
        if not running <= set(found["reads"]):
            self.refuse_upgrade("the new code reads state versions %s, the running workers "
                                "hand over %s" % (found["reads"], sorted(running)))
            return
        up.version = found["version"]
        if self.ctx.get_start_method() != "spawn":
            log.info("upgrade: processes start with spawn from now on: %s would copy "
                     "the old code", self.ctx.get_start_method())
            self.ctx = multiprocessing.get_context("spawn")
        slots = list(range(up.config.workers))
        for slot in slots:
            self.spawn(self.worker_class, slot, config=up.config, into=up.successors)
        self.spawn(self.broker_class, None, slots, self.moderation, self.accounts, True,
                   config=up.config, into=up.successors)
        listeners = [(sock.dup(), kind) for sock, kind in self.listeners]
        try:
            self.spawn(Acceptor, None, listeners, len(slots), self.moderation,
                       config=up.config, into=up.successors)
        finally:
            for sock, _ in listeners:
                sock.close()
        up.phase, up.deadline = "start", time.monotonic() + READY_TIMEOUT

    def advance_upgrade(self, now):
        """The next step, once the last one is done (or, past the switch's
        point of no return, has had its time)."""
        up = self.upgrade
        if up.phase == "probe":
            if now > up.deadline:
                self.refuse_upgrade("the new code did not answer within %.0f s" % probe.TIMEOUT)
        elif up.phase == "start":
            if all(c.ready for c in up.successors.values()):
                self.drain()
            elif now > up.deadline:
                self.refuse_upgrade("the new processes did not start within %.0f s"
                                    % READY_TIMEOUT)
        elif up.phase == "quiesce":
            if now > up.deadline:
                self.kill_old("did not let go of its connections",
                              lambda c: c.role == "acceptor" or not c.quiet)
            if all(c.quiet for c in up.old.values() if c.role == "worker"):
                self.retire_broker()
        elif up.phase == "drain":
            if now > up.deadline:
                self.kill_old("did not retire", lambda c: c.role == "broker")
                up.deadline = now + SWITCH_TIMEOUT
            if all(c.drained for c in up.old.values() if c.role == "worker"):
                self.hand_over()
        elif up.phase == "move":
            if all(n <= 0 for n in up.adoptions.values()) or now > up.deadline:
                self.begin()
        elif up.phase == "finish":
            for key, child in list(up.old.items()):
                if child.relaying:
                    del up.old[key]
                    self.tls_relays += 1
                    child.role, child.slot = "tls-relay", self.tls_relays
                    self.children[("tls-relay", child.slot)] = child
            if now > up.deadline:
                self.kill_old("did not exit", lambda c: True)
            if not up.old:
                self.upgraded(now)

    def kill_old(self, what, which):
        """Past the switch's deadline: an old process that is stuck goes as
        a crash would (its death is handled in upgrade_death)."""
        for child in self.upgrade.old.values():
            if which(child) and child.process.is_alive():
                log.error("upgrade: old %s (pid %d) %s within %.0f s; killing it",
                          child.name, child.process.pid, what, SWITCH_TIMEOUT)
                child.process.kill()

    def drain(self):
        """The point of no return: the old acceptor retires (new connections
        wait in the backlog), and the old workers finish their TLS
        handshakes under way, serving their clients (a handshake gets its
        usual timeout)."""
        up = self.upgrade
        up.ready_at = time.monotonic()
        up.phase, up.deadline = "quiesce", up.ready_at + SWITCH_TIMEOUT + (
            self.config.tls_handshake_timeout if self.config.tls_cert else 0)
        up.old = {key: c for key, c in self.children.items() if c.role != "tls-relay"}
        for key in up.old:
            del self.children[key]
        for child in up.old.values():
            if child.role != "broker":
                child.order("pause" if child.role == "worker" else "retire")

    def retire_broker(self):
        """No connection can come any more: the old broker retires; lines
        between workers wait for the new one from now on."""
        up = self.upgrade
        up.paused = time.monotonic()
        up.phase, up.deadline = "drain", up.paused + SWITCH_TIMEOUT
        for child in up.old.values():
            if child.role == "broker":
                child.order("retire")

    def hand_over(self):
        """Each old worker's connections to a new one, over a socket pair of
        their own (fewer new workers: some take two old ones' connections)."""
        up = self.upgrade
        up.phase, up.deadline = "move", time.monotonic() + SWITCH_TIMEOUT
        heirs = sorted(slot for role, slot in up.successors if role == "worker")
        old = sorted(slot for role, slot in up.old if role == "worker")
        for k, slot in enumerate(old):
            heir = up.successors.get(("worker", heirs[k % len(heirs)]))
            if heir is None:            # died since it started: its slot restarts empty
                continue
            ours, theirs = socket.socketpair()
            up.old[("worker", slot)].order("export", handles=[ours])
            heir.order("adopt", handles=[theirs])
            ours.close()
            theirs.close()
            key = (heir.role, heir.slot)
            up.adoptions[key] = up.adoptions.get(key, 0) + 1

    def begin(self):
        """The new processes take over: the broker learns the users from its
        workers, the acceptor starts handing them connections. One that died
        during the switch is started again, as after a crash."""
        up = self.upgrade
        up.resumed = time.monotonic()
        up.phase, up.deadline = "finish", up.resumed + SWITCH_TIMEOUT
        self.children.update(up.successors)
        up.successors = {}
        self.config = up.config
        for slot in range(up.config.workers):
            if ("worker", slot) not in self.children:
                self.spawn(self.worker_class, slot)
        broker = self.children.get(("broker", None))
        if broker is None:
            self.start_broker()
        else:
            broker.order("begin", self.moderation, self.accounts)
            for slot in self.worker_slots():
                self.connect(slot, "broker")
        if ("acceptor", None) not in self.children:
            self.start_acceptor()
        else:
            for slot in self.worker_slots():
                self.connect(slot, "acceptor")

    def upgraded(self, now):
        """Done: the new processes serve, the old ones are gone (or relay)."""
        up = self.upgrade
        if self.config.log_file:
            logs.reopen()               # as the new processes did: rotated files are left
        moved = relayed = 0
        for child in self.children.values():
            if child.adopted is not None:
                moved, relayed = moved + child.adopted[0], relayed + child.adopted[1]
                child.adopted = None
        line = "upgraded from %s to %s in %.2f s: %s moved" % (
            self.version, up.version, now - up.started, counted(moved, "connection"))
        if relayed:
            line += " (%d over TLS, relayed)" % relayed
        log.info("upgrade: the new processes were ready %.2f s after the command; lines "
                 "between workers waited %.3f s for the new broker", up.ready_at - up.started,
                 up.resumed - up.paused)
        log.info("%s", line)
        self.version, self.version_since = up.version, time.time()
        self.upgrades += 1
        self.upgrade = None
        up.reply([line], None)
        notify("READY=1\nSTATUS=%s" % line)

    def refuse_upgrade(self, reason):
        """Before the switch: the new processes go, the running ones never knew."""
        up = self.upgrade
        for child in up.successors.values():
            child.process.kill()
        for child in up.successors.values():
            reap(child)
        if up.probe is not None:
            up.probe.kill()
            probe.outcome(up.probe)
        self.upgrade = None
        log.error("upgrade refused: %s; the running processes carry on", reason)
        up.reply([], "upgrade-failed %s" % reason)
        notify("READY=1")

    def upgrade_death(self, child):
        up = self.upgrade
        how = reap(child)
        key = (child.role, child.slot)
        if up.old.get(key) is child:
            del up.old[key]
            if child.role == "acceptor" and child.info:
                self.retired_accepted += child.info["accepted"]
                self.retired_refused.update(child.info["refused"])
            if child.role == "worker" and not child.drained:
                log.error("upgrade: old %s (pid %d) %s before it handed over",
                          child.name, child.process.pid, how)
            return
        if up.phase in ("probe", "start"):
            self.refuse_upgrade("%s %s at start-up" % (child.name, how))
            return
        del up.successors[key]
        up.adoptions.pop(key, None)
        log.error("upgrade: new %s (pid %d) %s during the switch", child.name,
                  child.process.pid, how)

    # -- stopping -------------------------------------------------------------

    def shutdown(self):
        """Acceptor first (no new clients), then workers (each client gets
        ``ERR server-shutdown``), then the broker; SIGKILL for stragglers."""
        self.stopping = True
        notify("STOPPING=1")
        deadline = time.monotonic() + STOP_GRACE
        for role in ("acceptor", "worker", "broker", "tls-relay"):
            group = [c for c in self.everyone() if c.role == role]
            for child in group:
                child.order("stop")
            for child in group:
                child.process.join(max(0.0, deadline - time.monotonic()))
        for child in self.everyone():
            if child.process.is_alive():
                log.warning("%s (pid %d) did not stop; killing it", child.name, child.process.pid)
                child.process.kill()
                child.process.join(1.0)
        self.children.clear()
        for sock, _ in self.listeners:
            sock.close()
        for endpoint in (self.control, self.metrics):
            if endpoint is not None:
                endpoint.close()
        log.info("stopped")


def counted(number, noun):
    return "%d %s%s" % (number, noun, "" if number == 1 else "s")


def reap(child):
    """Wait for a dead child's exit status (its reports pipe can close a
    moment before it is reaped; make sure of it if it does not come), close
    our ends of its pipes; how it ended, for the log."""
    child.process.join(0.5)
    if child.process.exitcode is None:
        child.process.kill()
        child.process.join()
    child.orders.close()
    child.reports.close()
    code = child.process.exitcode
    return "killed by %s" % signal.Signals(-code).name if code and code < 0 \
        else "exited with status %s" % code


def notify(message):
    """Tell systemd how we are doing (``READY=1``, ``STATUS=...``): the
    ``sd_notify`` protocol, one datagram of ``KEY=value`` lines to
    ``$NOTIFY_SOCKET`` when the unit is ``Type=notify``; without it,
    nothing. No libsystemd needed. True if it was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):               # Linux abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)
    except OSError:
        return False
    return True
