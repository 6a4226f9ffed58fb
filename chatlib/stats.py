"""Live statistics, from the figures every child sends with its heartbeat.

The workers count cumulatively (messages in, deliveries, bytes, cuts, IPC
batches); a :class:`StatsReport` remembers the last totals it saw so it can
turn them into rates since the previous line. No second protocol on the chat
port: the figures go to the log, where only the operator looks.
"""

import time

from chatlib.metrics import Histogram

# What every worker counts from its start, and the report sums over them.
COUNTERS = ("msgs", "deliveries", "bytes_in", "bytes_out", "slow_cuts",
            "flood_cuts", "batches", "events")


class StatsReport:
    def __init__(self):
        self.last_totals = dict.fromkeys(COUNTERS, 0)
        self.last_time = time.monotonic()

    def line(self, workers, users, cluster=None, relayed=None):
        """One log line; ``workers`` maps slot to that worker's last heartbeat
        info, ``cluster`` is the broker's figures in cluster mode, ``relayed``
        the TLS connections old workers relay (with TLS)."""
        now = time.monotonic()
        elapsed = max(now - self.last_time, 1e-9)
        totals = self.totals(workers)
        rate = {key: max(0, totals[key] - self.last_totals[key]) / elapsed for key in COUNTERS}
        self.last_totals, self.last_time = totals, now
        per_worker = ",".join(str(workers[k].get("clients", 0)) for k in sorted(workers))
        batch = totals["events"] / totals["batches"] if totals["batches"] else 0.0
        return ("stats: clients=%d users=%d per-worker=[%s] msgs=%d (%.1f/s) "
                "deliveries=%d (%.1f/s) bytes-in=%d bytes-out=%d slow-cuts=%d "
                "flood-cuts=%d ipc-batches=%d events-per-batch=%.1f"
                % (self.clients(workers), users, per_worker, totals["msgs"], rate["msgs"],
                   totals["deliveries"], rate["deliveries"], totals["bytes_in"],
                   totals["bytes_out"], totals["slow_cuts"], totals["flood_cuts"],
                   totals["batches"], batch)
                + self.tls_part(workers, relayed) + self.cluster_part(cluster))

    def figures(self, workers, users, cluster=None, relayed=None):
        """The line's figures as (name, value) pairs, for the operator's
        ``stats`` (totals since start: no rates, which only a series shows)."""
        totals = self.totals(workers)
        pairs = [("clients", self.clients(workers)), ("users", users),
                 ("per-worker", ",".join(str(workers[k].get("clients", 0))
                                         for k in sorted(workers)))]
        pairs += [(key.replace("_", "-"), totals[key]) for key in COUNTERS]
        for part in (self.tls_part(workers, relayed), self.cluster_part(cluster)):
            pairs += [tuple(word.split("=", 1)) for word in part.split() if "=" in word]
        return pairs

    @staticmethod
    def totals(workers):
        return {key: sum(info.get(key, 0) for info in workers.values()) for key in COUNTERS}

    @staticmethod
    def cluster_part(cluster):
        """In cluster mode: whether this node can reach Redis, the users of
        the other nodes, bus entries written and read since start, and
        the bytes waiting for Redis."""
        if cluster is None:
            return ""
        return (" cluster: redis=%s other-users=%d entries-out=%d entries-in=%d backlog=%d"
                % (cluster["redis"], cluster["other_users"], cluster["entries_out"],
                   cluster["entries_in"], cluster["backlog"]))

    @staticmethod
    def tls_part(workers, relayed=None):
        """With TLS: handshakes done, failed (a scanner, a plaintext client on
        the TLS port, a timeout), and in progress, since start; connections
        relayed by old workers since an upgrade (chatlib.upgrade.relay)."""
        tls = [info for info in workers.values() if "tls_handshakes" in info]
        if not tls:
            return ""
        return " tls-handshakes=%d tls-failed=%d tls-pending=%d tls-relayed=%d" % (tuple(
            sum(info.get(key, 0) for info in tls)
            for key in ("tls_handshakes", "tls_failed", "tls_pending")) + (relayed or 0,))

    @staticmethod
    def clients(workers):
        return sum(info.get("clients", 0) for info in workers.values())


def snapshot(workers, acceptor, users, cluster, restarts, uptime, upgrades, relayed):
    """Every figure of one node, from its processes' last heartbeats, in
    the shape :func:`chatlib.metrics.render` takes."""

    def summed(key):
        total = {}
        for info in workers.values():
            for label, count in info.get(key, {}).items():
                total[label] = total.get(label, 0) + count
        return total
    totals = StatsReport.totals(workers)
    figures = {
        "connections": StatsReport.clients(workers), "users": users,
        "workers": len(workers),
        "accepted": acceptor.get("accepted", 0), "refused": acceptor.get("refused", {}),
        "logins": summed("logins"), "messages": totals["msgs"],
        "deliveries": totals["deliveries"], "bytes_in": totals["bytes_in"],
        "bytes_out": totals["bytes_out"], "disconnects": summed("disconnects"),
        "restarts": restarts, "uptime_seconds": uptime, "upgrades": upgrades,
        "tls_relayed": relayed,
        "broadcast_seconds": Histogram.merge(
            [info["broadcast_seconds"] for info in workers.values()
             if "broadcast_seconds" in info]),
        "tls_handshakes": None, "cluster": None}
    if relayed is not None:          # with TLS
        figures["tls_handshakes"] = {
            "ok": sum(info.get("tls_handshakes", 0) for info in workers.values()),
            "failed": sum(info.get("tls_failed", 0) for info in workers.values())}
    if cluster is not None:
        figures["cluster"] = {"redis_up": int(cluster["redis"] == "up"),
                              "nodes": cluster.get("nodes", 0),
                              "entries_in": cluster["entries_in"],
                              "entries_out": cluster["entries_out"]}
    return figures
