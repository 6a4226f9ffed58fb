"""Password checks off the event loop: a few worker threads, and a socket
the loop selects on to hear that one is done.

The rules this module keeps:

1. Bounded: at most ``max_in_flight`` hashes run at once (each takes 16 MiB
   or more and a core for tens of milliseconds), at most ``max_queued``
   wait; past that :meth:`Hasher.submit` refuses, and the caller answers
   without hashing. A crowd of guessers costs a bounded amount of CPU and
   memory.
2. Never in the chat's way: ``hashlib.scrypt`` lets go of the GIL while it
   works, so the loop's thread runs on (a main-thread loop ran 7.7 M turns
   a second beside a thread hashing without a break, as many as alone; a
   pure-Python thread halves it). On Linux each worker thread also lowers
   its own priority, so that a hash only takes a core the chat does not
   want (both threads on one core: the loop kept 99% of its speed at nice
   19, 39% at nice 0).
3. A result is a value: an exception raised by a job comes back as the
   job's result (without its traceback, which would keep the password
   alive), as redis-py hands out an error reply.
4. Threads and fork do not mix: create a Hasher in the process that uses
   it (the broker), after the fork, never in the supervisor. It refuses to
   be used in a process forked from the one that made it.

This is the only module of the server with threads of its own.
"""

import collections
import os
import socket
import sys
import threading

_NICE = 19          # the lowest priority a thread may give itself
_JOIN_TIMEOUT = 5.0  # seconds close() waits for each thread (a hash is not interruptible)


class Hasher:
    """Runs ``func(*args)`` jobs in ``max_in_flight`` daemon threads,
    started at the first :meth:`submit` (a server without accounts starts
    none). The loop selects on :meth:`fileno` and collects :meth:`results`."""

    def __init__(self, max_in_flight=1, max_queued=64, idle_priority=True):
        if max_in_flight < 1 or max_queued < 0:
            raise ValueError("max_in_flight must be 1 or more, max_queued 0 or more")
        self.max_in_flight = max_in_flight
        self.max_queued = max_queued
        self.idle_priority = idle_priority
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._waiting = collections.deque()     # (job, func, args) not started yet
        self._done = []                         # (job, value or exception) not collected yet
        self._pending = 0                       # submitted, not yet handed out by results()
        self._threads = []
        self._closed = False
        # The workers write a byte to wake the loop; a full buffer means a
        # wake-up is already on its way, so none ever blocks.
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)

    def __repr__(self):
        return "<Hasher: %d pending, %d threads>" % (self._pending, len(self._threads))

    @property
    def pending(self):
        """Jobs submitted whose results :meth:`results` has not handed out yet."""
        return self._pending

    def fileno(self):
        """Readable when results are ready: for a selector."""
        return self._wake_reader.fileno()

    def submit(self, job, func, *args):
        """Queue ``func(*args)``, its result to come back with ``job`` (any
        hashable the caller matches results with). False, and nothing
        queued, if ``max_queued`` jobs wait already."""
        if os.getpid() != self._pid:
            raise RuntimeError("a Hasher cannot be used across fork(): create it after")
        if self._closed:
            raise RuntimeError("the Hasher is closed")
        with self._work:
            if len(self._waiting) >= self.max_queued:
                return False
            self._waiting.append((job, func, args))
            self._pending += 1
            self._work.notify()
        if len(self._threads) < self.max_in_flight:
            self._start_threads()
        return True

    def results(self):
        """The jobs done since the last call, as ``[(job, value or
        exception)]``, in the order they finished. Never blocks."""
        # Drain first, then take the list: a job done in between leaves a
        # byte for the next select, never a result without a wake-up.
        try:
            while self._wake_reader.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        with self._lock:
            done, self._done = self._done, []
            self._pending -= len(done)
        return done

    def close(self):
        """Stop the threads: the jobs still waiting are dropped, a hash
        under way is waited for, for a few seconds at most."""
        with self._work:
            self._closed = True
            self._waiting.clear()
            self._work.notify_all()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(_JOIN_TIMEOUT)
        with self._lock:
            self._wake_reader.close()
            self._wake_writer.close()

    def _start_threads(self):
        while len(self._threads) < self.max_in_flight:
            thread = threading.Thread(target=self._work_loop, daemon=True,
                                      name="hasher-%d" % len(self._threads))
            self._threads.append(thread)
            thread.start()

    def _work_loop(self):
        if self.idle_priority:
            lower_thread_priority()
        while True:
            with self._work:
                while not self._waiting and not self._closed:
                    self._work.wait()
                if self._closed:
                    return
                job, func, args = self._waiting.popleft()
            try:
                value = func(*args)
            except Exception as e:
                value = e.with_traceback(None)
            del func, args          # the password goes as soon as the hash is done
            with self._lock:
                # Under the lock, and only if not closed: close() may have
                # closed the socket, and its number may be another's now.
                if self._closed:
                    return
                self._done.append((job, value))
                try:
                    self._wake_writer.send(b"\0")
                except BlockingIOError:     # full: a wake-up is on its way already
                    pass
            del value


def lower_thread_priority():
    """Give the calling thread the lowest priority it can have: nice 19,
    on Linux, where a thread's niceness is its own (elsewhere setpriority
    would lower the whole process). Silently nothing if not allowed.

    Not SCHED_IDLE: a thread starved of CPU while it holds the GIL (for the
    microseconds around a hash) would stall the loop's thread with it, and
    nice 19 starves it less."""
    if not sys.platform.startswith("linux"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _NICE)
    except (AttributeError, OSError):
        pass
