"""What every child process (acceptor, worker, broker) does the same way.

A :class:`Service` is started by the supervisor with :func:`run_service`, the
one picklable entry point, so it works under ``fork``, ``spawn`` and
``forkserver`` alike: everything a child needs arrives as arguments.

Each child runs one selector loop that also watches two things besides its
own work: its pipe of orders from the supervisor, and the supervisor's
sentinel (``parent_process().sentinel``), which becomes readable when the
supervisor dies, even under ``forkserver`` where the child is not the
supervisor's own child. So a child never outlives the server.

Orders and reports (ready, heartbeats) travel on two pipes, one each way,
because some orders carry a descriptor, and a pipe that carries descriptors
carries nothing else back (docs/ARCHITECTURE.md, "Processes").
"""

import logging
import multiprocessing
import os
import selectors
import signal
import socket
import sys
import time

from multiprocessing.reduction import recv_handle

from chatlib import logs

MAX_HEARTBEAT_INTERVAL = 0.5  # seconds between heartbeats to the supervisor


class Service:
    """Base class: subclasses set :attr:`role`, register their descriptors
    in :meth:`start`, handle events in :meth:`on_event`, and may override
    :meth:`tick` (run every loop turn), :meth:`on_order` and :meth:`stop`."""

    role = "service"
    ready_when_started = True   # else the service calls report_ready() itself

    def __init__(self, config, pipes, slot=None):
        self.config = config
        self.orders, self.reports = pipes     # from / to the supervisor
        self.slot = slot
        self.name = self.role if slot is None else "%s-%d" % (self.role, slot)
        self.running = True
        self.log = logging.getLogger(self.name)
        self.sel = None
        self._next_heartbeat = 0.0
        # Four heartbeats per timeout: one late turn is not taken for a hang.
        self.heartbeat_interval = min(MAX_HEARTBEAT_INTERVAL, config.heartbeat_timeout / 4)

    # -- the process ----------------------------------------------------------

    def main(self):
        logs.setup(self.name, self.config.log_level, self.config.log_file)
        logs.set_process_title("chat-" + self.name)
        # Ctrl-C reaches the whole foreground process group; the supervisor
        # alone decides how to stop, and tells us over the orders pipe.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        # Under fork we inherited the supervisor's wake-up socket: a signal
        # here must not wake the supervisor.
        signal.set_wakeup_fd(-1)
        prefer_batching()
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.orders.fileno(), selectors.EVENT_READ, self._read_order)
        parent = multiprocessing.parent_process()
        if parent is not None:
            self.sel.register(parent.sentinel, selectors.EVENT_READ, self._on_parent_gone)
        self.start()
        if self.ready_when_started:
            self.report_ready()
        try:
            while self.running:
                self.on_events(self.sel.select(self.poll_timeout()))
                now = time.monotonic()
                self.tick(now)
                if now >= self._next_heartbeat:
                    self.report_heartbeat(now)
            self.report_heartbeat(time.monotonic())    # the last figures, for the totals
        finally:
            self.finish()
        logging.shutdown()
        sys.exit(0)

    def _read_order(self, mask=None):
        try:
            order = self.orders.recv()
        except (EOFError, OSError):
            self._on_parent_gone()
            return
        if order[0] == "stop":
            self.log.debug("asked to stop")
            self.stop()
        elif order[0] == "reopen-log":
            logs.reopen()
        else:
            self.on_order(order)

    def _on_parent_gone(self, mask=None):
        self.log.warning("supervisor is gone; exiting")
        self.running = False

    def _report(self, message):
        try:
            self.reports.send(message)
        except OSError:
            self._on_parent_gone()

    def report_heartbeat(self, now):
        """I am alive, and my figures (``heartbeat_info``) as of ``now``."""
        self._next_heartbeat = now + self.heartbeat_interval
        self._report(("heartbeat", self.heartbeat_info(), now))

    def report_ready(self):
        """Tell the supervisor we can serve (it says ``listening on`` once all
        can), and which code we run: the supervisor's may be older (an upgrade)."""
        from chatlib import __version__
        from chatlib.upgrade import state
        self._report(("ready", {"version": __version__, "state": state.VERSION}))

    def fatal(self, message):
        """A condition no restart can cure (a duplicate cluster node id): the
        supervisor logs ``message`` and stops the server with status 2."""
        self._report(("fatal", message))
        self.running = False

    def received_fd(self):
        """The descriptor the supervisor sends right after an order that needs one."""
        return recv_handle(self.orders)

    def received_socket(self):
        return socket.socket(fileno=self.received_fd())

    # -- hooks ----------------------------------------------------------------

    def start(self):
        """Register this service's descriptors on :attr:`sel`."""

    def on_events(self, events):
        """Default dispatch: every key's data is a callable taking the mask."""
        for key, mask in events:
            key.data(mask)

    def poll_timeout(self):
        return self.heartbeat_interval

    def tick(self, now):
        """Called once per loop turn, after the events."""

    def on_order(self, order):
        self.log.error("unknown order from supervisor: %r", order)

    def heartbeat_info(self):
        return None

    def stop(self):
        """Asked to stop: by default, leave the loop."""
        self.running = False

    def finish(self):
        """Last words before the process exits."""


def prefer_batching():
    """Run as ``SCHED_BATCH`` (Linux), if the operator chose no other policy.

    Our processes wake one another all the time (acceptor to worker, worker
    to broker and back). Under the default policy each wake-up preempts
    whoever runs, so on a busy machine every process runs for every single
    event, paying a context switch and a loop turn each time. A batch
    thread does not preempt on wake-up: it runs a moment later and finds
    several events waiting: with more processes than cores, one wake-up then
    serves many events, where most of a login's CPU went, and DM round trips
    do not suffer (figures: docs/BENCHMARKS.md, "Why the misses").
    The nice value is kept.
    """
    if hasattr(os, "SCHED_BATCH"):
        try:
            if os.sched_getscheduler(0) == os.SCHED_OTHER:
                os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        except OSError:
            pass


def run_service(service_cls, config, *args):
    """Process target: build the service in the child and run it. After an
    upgrade the options come from older code: what they lack gets this
    code's defaults (which takes argparse: only then)."""
    if getattr(config, "upgraded", False):
        from chatlib.config import completed
        config = completed(config)
    service_cls(config, *args).main()
