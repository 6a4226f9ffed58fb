#!/usr/bin/env python3
"""TLS against plaintext, the same load both ways: the figures of docs/BENCHMARKS.md.

``../shared/bench/loadgen.py`` speaks plaintext only. This is a smaller
generator whose clients speak either (``--tls``: Python's ``ssl`` as a
sans-IO ``SSLObject``, no certificate check: ``tlsclient.py``, which
``stress.py --tls`` uses too), so the two runs differ in the transport and
nothing else:

    tls_bench.py fanout --port P [--tls] --clients 1000 --senders 10 --duration 10 --server-pid PID
    tls_bench.py dm     --port P [--tls] --pairs 50 --duration 10 --server-pid PID
    tls_bench.py handshakes --port P --duration 10 --server-pid PID     (TLS only)
    tls_bench.py idle   --port P [--tls] --clients 2000 --server-pid PID

``fanout``: N clients, S of them send ``MSG`` in a closed loop (a sender is
at most ``--window`` messages ahead of what a receiver in its own process has
seen), all read; deliveries/s and the server's CPU per delivery. ``dm``: pairs
bounce a DM, round trips p50/p99. ``handshakes``: connect, handshake, close,
in a loop; handshakes/s and server CPU per handshake. ``idle``: logged-in
clients that do nothing; server memory per connection. The server's CPU and
memory are summed over its session (start it with ``setsid``). The last line
printed is one JSON object.
"""

import argparse
import json
import multiprocessing
import os
import selectors
import socket
import sys
import time

from procfs import usage
from tlsclient import TlsClient, client_context

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE


class Conn:
    """A non-blocking connection, plaintext or sans-IO TLS (:class:`TlsClient`)."""

    def __init__(self, host, port, tls_context):
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.tls = None
        self.out = b""
        self.buf = b""
        if tls_context is not None:
            self.tls = TlsClient(tls_context)
            self.out = self.tls.start()
            self.flush()

    def fileno(self):
        return self.sock.fileno()

    def send(self, data):
        self.out += data if self.tls is None else self.tls.encrypt(data)
        self.flush()

    def flush(self):
        if self.out:
            try:
                n = self.sock.send(self.out)
            except BlockingIOError:
                n = 0
            self.out = self.out[n:]
        return not self.out

    def read(self):
        """Plaintext now available (b"" if none); raises EOFError at the end."""
        try:
            data = self.sock.recv(1 << 18)
        except BlockingIOError:
            return b""
        if not data:
            raise EOFError
        if self.tls is None:
            return data
        data, reply = self.tls.decrypt(data)
        if reply:
            self.out += reply
            self.flush()
        if self.tls.closed and not data:
            raise EOFError
        return data


def connect_all(cfg, n, prefix):
    """``n`` logged-in connections (names ``prefix0`` ...)."""
    ctx = client_context() if cfg.tls else None
    sel = selectors.DefaultSelector()
    conns = []
    for i in range(n):
        c = Conn(cfg.host, cfg.port, ctx)
        c.name = "%s%d" % (prefix, i)
        c.send(b"LOGIN %s\n" % c.name.encode())
        conns.append(c)
        sel.register(c, READ, c)
    waiting = set(conns)
    deadline = time.monotonic() + 60
    while waiting:
        if time.monotonic() > deadline:
            raise SystemExit("%d logins unanswered" % len(waiting))
        for key, _ in sel.select(0.5):
            c = key.data
            c.buf += c.read()
            if c in waiting and b"\n" in c.buf:
                line, c.buf = c.buf.split(b"\n", 1)
                if line != b"OK":
                    raise SystemExit("login %s: %r" % (c.name, line))
                waiting.discard(c)
        for c in conns:
            c.flush()
    return sel, conns


# -- fanout ---------------------------------------------------------------------

def fanout_proc(cfg, k, barrier, results):
    mine = range(k, cfg.clients, cfg.procs)
    sel, conns = connect_all(cfg, len(mine), "f%d_" % k)
    senders = [c for i, c in zip(mine, conns) if i < cfg.senders]
    witness = next(c for i, c in zip(mine, conns) if i >= cfg.senders)
    for s in senders:
        s.seq, s.seen = 0, 0
        s.tag = s.name.encode()
    by_tag = {s.tag: s for s in senders}
    pad = b"x" * cfg.size
    barrier.wait()
    start = time.monotonic()
    end = start + cfg.duration
    deliveries = 0
    while True:
        now = time.monotonic()
        if now >= end:
            break
        for s in senders:
            burst = []
            while s.seq - s.seen < cfg.window:
                s.seq += 1
                burst.append(b"MSG %d %s\n" % (s.seq, pad))
            if burst:
                s.send(b"".join(burst))
        for key, mask in sel.select(0.01):
            c = key.data
            try:
                data = c.read()
            except EOFError:
                raise SystemExit("%s: connection closed" % c.name)
            deliveries += data.count(b"\n")
            if c is witness:
                data = c.buf + data
                cut = data.rfind(b"\n") + 1
                c.buf = data[cut:]
                for line in data[:cut].split(b"\n")[:-1]:
                    parts = line.split(b" ", 3)
                    s = by_tag.get(parts[1]) if len(parts) > 2 else None
                    if s is not None:
                        s.seen = max(s.seen, int(parts[2]))
        for c in senders:
            c.flush()
    results.put(("fanout", deliveries, sum(s.seq for s in senders)))


def in_processes(cfg, target):
    """Run ``target(cfg, k, barrier, results)`` in ``--procs`` processes, all
    starting together; (their results, seconds, server CPU seconds)."""
    barrier = multiprocessing.Barrier(cfg.procs + 1)
    results = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=target, args=(cfg, k, barrier, results))
             for k in range(cfg.procs)]
    for p in procs:
        p.start()
    barrier.wait()
    cpu0, _ = usage([cfg.server_pid]) if cfg.server_pid else (0, 0)
    t0 = time.monotonic()
    got = [results.get(timeout=cfg.duration + 60) for _ in procs]
    elapsed = time.monotonic() - t0
    cpu1, _ = usage([cfg.server_pid]) if cfg.server_pid else (0, 0)
    for p in procs:
        p.join()
    return got, elapsed, cpu1 - cpu0


def run_fanout(cfg):
    got, elapsed, cpu = in_processes(cfg, fanout_proc)
    gen = os.times()
    deliveries = sum(g[1] for g in got)
    return {"deliveries_per_s": round(deliveries / elapsed),
            "generator_cpu_s": round(gen.children_user + gen.children_system, 2),
            "msgs_sent": sum(g[2] for g in got),
            "server_cpu_s": round(cpu, 2),
            "server_cpu_us_per_delivery": round(cpu / deliveries * 1e6, 3)
            if deliveries else None}


# -- dm ---------------------------------------------------------------------------

def dm_proc(cfg, k, barrier, results):
    pairs = range(k, cfg.pairs, cfg.procs)
    sel, conns = connect_all(cfg, 2 * len(pairs), "d%d_" % k)
    rtts = []
    pairs = [(conns[2 * i], conns[2 * i + 1]) for i in range(len(pairs))]
    for a, b in pairs:
        a.peer, b.peer = b, a
        a.pinger = True
        b.pinger = False
    barrier.wait()
    end = time.monotonic() + cfg.duration
    for a, b in pairs:
        a.send(b"DM %s %d\n" % (b.name.encode(), time.perf_counter_ns()))
    while time.monotonic() < end:
        for key, _ in sel.select(0.05):
            c = key.data
            c.buf += c.read()
            while b"\n" in c.buf:
                line, c.buf = c.buf.split(b"\n", 1)
                stamp = line.rsplit(b" ", 1)[1]
                if c.pinger:
                    now = time.perf_counter_ns()
                    rtts.append((now - int(stamp)) / 1e6)
                    c.send(b"DM %s %d\n" % (c.peer.name.encode(), now))
                else:
                    c.send(b"DM %s %s\n" % (c.peer.name.encode(), stamp))
    results.put(rtts)


def run_dm(cfg):
    got, _, _ = in_processes(cfg, dm_proc)
    rtts = sorted(r for rtts in got for r in rtts)
    pick = lambda q: round(rtts[min(len(rtts) - 1, int(q * len(rtts)))], 3)
    return {"round_trips": len(rtts), "rtt_p50_ms": pick(0.5), "rtt_p99_ms": pick(0.99)}


# -- handshakes ---------------------------------------------------------------------

def handshake_proc(cfg, k, barrier, results):
    ctx = client_context()
    barrier.wait()
    end = time.monotonic() + cfg.duration
    done = 0
    while time.monotonic() < end:
        raw = socket.create_connection((cfg.host, cfg.port))
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(b"PING\n")     # a round trip: the server has finished its side
            s.recv(64)
        done += 1
    results.put(done)


def run_handshakes(cfg):
    got, elapsed, cpu = in_processes(cfg, handshake_proc)
    done = sum(got)
    return {"handshakes_per_s": round(done / elapsed, 1),
            "server_cpu_ms_per_handshake": round(cpu / done * 1e3, 3) if done else None}


# -- idle ---------------------------------------------------------------------------

def run_idle(cfg):
    _, rss0 = usage([cfg.server_pid])
    sel, conns = connect_all(cfg, cfg.clients, "i")
    time.sleep(1.0)          # let the heartbeats and the kernel settle before reading RSS
    _, rss1 = usage([cfg.server_pid])
    for c in conns:
        c.sock.close()
    return {"clients": cfg.clients, "server_rss_growth_mib": round((rss1 - rss0) / 2 ** 20, 1),
            "rss_per_conn_kb": round((rss1 - rss0) / cfg.clients / 1024, 2)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("scenario", choices=["fanout", "dm", "handshakes", "idle"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--tls", action="store_true", help="speak TLS (handshakes: always)")
    p.add_argument("--server-pid", type=int, default=0,
                   help="the server's main pid, leader of its session")
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--senders", type=int, default=10)
    p.add_argument("--pairs", type=int, default=50)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--size", type=int, default=32, help="message text bytes")
    p.add_argument("--window", type=int, default=20,
                   help="fanout: messages a sender may be ahead of its process's witness")
    p.add_argument("--label", default="")
    cfg = p.parse_args(argv)
    if cfg.scenario == "handshakes":
        cfg.tls = True
    multiprocessing.set_start_method("fork")
    run = {"fanout": run_fanout, "dm": run_dm, "handshakes": run_handshakes,
           "idle": run_idle}[cfg.scenario]
    result = dict(scenario=cfg.scenario, tls=cfg.tls, label=cfg.label, **run(cfg))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
