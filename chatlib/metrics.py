"""Metrics in the Prometheus text format (0.0.4).

Two parts, each usable alone:

* :class:`Histogram`: fixed buckets, cheap enough to time every broadcast.
  Each process keeps its own and sends :meth:`Histogram.state` with its
  heartbeat; :meth:`Histogram.merge` sums them.
* :func:`render`: one snapshot dict (the shape is in its docstring) to the
  text that the operator command prints and ``GET /metrics`` serves. Which
  figure becomes which family is the table :data:`FAMILIES`, one row each.
"""

import math
from bisect import bisect_left
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds: from half a millisecond (a few local recipients) to 2.5 s (a
# worker far behind); above the last bound is the +Inf bucket alone.
BROADCAST_BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


# -- the histogram ------------------------------------------------------------

class HistogramState(NamedTuple):
    """What a process sends of its histogram: picklable, a tuple.

    ``counts`` holds one count per bucket, *not* cumulative: observations
    at most ``bounds[i]`` and above ``bounds[i - 1]``, and last, those above
    every bound."""
    counts: Tuple[int, ...]
    sum: float
    count: int


class Histogram:
    """Observations counted in fixed buckets (``le``: at most the bound)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds=BROADCAST_BOUNDS):
        bounds = tuple(bounds)
        if not bounds or not all(math.isfinite(b) for b in bounds) \
                or any(a >= b for a, b in zip(bounds, bounds[1:])):
            raise ValueError("histogram bounds must be finite and increasing: %r" % (bounds,))
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)     # the last: above every bound
        self.sum = 0.0

    def observe(self, seconds):
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def state(self):
        return HistogramState(tuple(self.counts), self.sum, sum(self.counts))

    @staticmethod
    def merge(states, bounds=BROADCAST_BOUNDS):
        """The sum of several processes' states (``None``: a process that
        sent none yet); with none, the empty state for ``bounds``."""
        counts = [0] * (len(bounds) + 1)
        total, count = 0.0, 0
        for state in states:
            if state is None:
                continue
            state = HistogramState(*state)
            if len(state.counts) != len(counts):
                raise ValueError("a histogram state of %d buckets, not %d"
                                 % (len(state.counts), len(counts)))
            counts = [a + b for a, b in zip(counts, state.counts)]
            total += state.sum
            count += state.count
        return HistogramState(tuple(counts), total, count)


# -- the text format ----------------------------------------------------------

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"


@dataclass(frozen=True)
class Family:
    """One metric family: where its figure is in the snapshot, and how it
    is shown. A figure that is a dict gives one series per key, in the
    dict's order, the key as the value of label ``label``."""
    name: str
    type: str
    help: str
    path: Tuple[str, ...]           # keys into the snapshot, outermost first
    label: Optional[str] = None
    bounds: Optional[Tuple[float, ...]] = None     # a histogram's


FAMILIES = (
    Family("chat_connections", GAUGE, "Open client connections on this node.",
           ("connections",)),
    Family("chat_users", GAUGE, "Logged-in users on this node.", ("users",)),
    Family("chat_connections_accepted_total", COUNTER, "Client connections accepted.",
           ("accepted",)),
    Family("chat_connections_refused_total", COUNTER,
           "Client connections refused at once, by reason.", ("refused",), "reason"),
    Family("chat_logins_total", COUNTER, "LOGIN commands answered, by result.",
           ("logins",), "result"),
    Family("chat_messages_received_total", COUNTER, "MSG lines received from clients.",
           ("messages",)),
    Family("chat_lines_delivered_total", COUNTER, "Lines delivered to users.",
           ("deliveries",)),
    Family("chat_received_bytes_total", COUNTER, "Bytes received from clients.",
           ("bytes_in",)),
    Family("chat_sent_bytes_total", COUNTER, "Bytes sent to clients.", ("bytes_out",)),
    Family("chat_disconnections_total", COUNTER, "Client connections closed, by reason.",
           ("disconnects",), "reason"),
    Family("chat_process_restarts_total", COUNTER,
           "Child processes replaced after they died, by role.", ("restarts",), "role"),
    Family("chat_tls_handshakes_total", COUNTER, "TLS handshakes finished, by result.",
           ("tls_handshakes",), "result"),
    Family("chat_cluster_redis_up", GAUGE, "1 if this node reaches Redis, else 0.",
           ("cluster", "redis_up")),
    Family("chat_cluster_nodes", GAUGE, "Nodes in the cluster, this one included.",
           ("cluster", "nodes")),
    Family("chat_cluster_bus_entries_received_total", COUNTER,
           "Entries read from the cluster bus.", ("cluster", "entries_in")),
    Family("chat_cluster_bus_entries_sent_total", COUNTER,
           "Entries written to the cluster bus.", ("cluster", "entries_out")),
    Family("chat_broadcast_duration_seconds", HISTOGRAM,
           "Time from the sender's worker reading a MSG to the last local "
           "recipient's write.", ("broadcast_seconds",), bounds=BROADCAST_BOUNDS),
    Family("chat_uptime_seconds", GAUGE, "Seconds since the server started.",
           ("uptime_seconds",)),
    Family("chat_workers", GAUGE, "Worker processes running.", ("workers",)),
)


def render(snapshot):
    """The text of ``snapshot``, a dict of this shape (every figure counts
    from the server's start, except those marked "now"; a part missing or
    None leaves its families out, as ``tls_handshakes`` without TLS and
    ``cluster`` outside cluster mode)::

        {"connections": int, "users": int,          # now
         "accepted": int,
         "refused": {"server-full": n, "too-many-connections": n, "banned": n},
         "logins": {"ok": n, "username-taken": n, ...},
         "messages": int, "deliveries": int, "bytes_in": int, "bytes_out": int,
         "disconnects": {"quit": n, "closed": n, ...},
         "restarts": {"acceptor": n, "worker": n, "broker": n},
         "tls_handshakes": {"ok": n, "failed": n} or None,
         "cluster": {"redis_up": 0 or 1, "nodes": n,             # now
                     "entries_in": n, "entries_out": n} or None,
         "broadcast_seconds": HistogramState with BROADCAST_BOUNDS,
         "uptime_seconds": float, "workers": int}                # now
    """
    lines = []
    for family in FAMILIES:
        figure = _figure(snapshot, family.path)
        if figure is None:
            continue
        samples = list(_samples(family, figure))
        if samples:
            lines.append("# HELP %s %s" % (family.name, _escape_help(family.help)))
            lines.append("# TYPE %s %s" % (family.name, family.type))
            lines.extend(samples)
    return "".join(line + "\n" for line in lines)


def _figure(snapshot, path):
    for key in path:
        if snapshot is None:
            return None
        snapshot = snapshot.get(key)
    return snapshot


def _samples(family, figure):
    if family.type == HISTOGRAM:
        yield from _histogram_samples(family, HistogramState(*figure))
    elif family.label is not None:
        for key, value in figure.items():
            yield _sample(family.name, {family.label: key}, value)
    else:
        yield _sample(family.name, {}, figure)


def _histogram_samples(family, state):
    if len(state.counts) != len(family.bounds) + 1:
        raise ValueError("%s: %d buckets for %d bounds"
                         % (family.name, len(state.counts), len(family.bounds)))
    cumulative = 0
    for bound, count in zip(family.bounds + (math.inf,), state.counts):
        cumulative += count
        yield _sample(family.name + "_bucket", {"le": format_value(bound)}, cumulative)
    yield _sample(family.name + "_sum", {}, state.sum)
    yield _sample(family.name + "_count", {}, cumulative)     # the +Inf bucket's, always


def _sample(name, labels, value):
    if labels:
        name += "{%s}" % ",".join('%s="%s"' % (key, escape_label_value(str(text)))
                                  for key, text in labels.items())
    return "%s %s" % (name, format_value(value))


def format_value(value):
    """A number as the format writes it: an integer in digits, a float as
    Python's ``repr`` (which Go's ParseFloat reads back exactly), ``+Inf``,
    ``-Inf``, ``NaN``."""
    if isinstance(value, int):          # bool included: True is 1
        return "%d" % value
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def escape_label_value(text):
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text):
    return text.replace("\\", "\\\\").replace("\n", "\\n")
