"""A TCP proxy that injects faults between a node and Redis: pass, stall, cut.

Partitions made real without root: the node talks to the proxy's port, the
proxy to Redis. ``stall()`` stops forwarding both ways but keeps every
connection open (a network that drops packets); ``cut()`` closes every
connection and refuses new ones (a peer that is gone); ``restore()`` passes
again; ``move(port)`` cuts every connection and sends new ones to another
server (a failover behind one address). One thread accepts, one thread per direction per connection copies.
"""

import select
import socket
import threading


class FaultProxy:
    def __init__(self, target_port, target_host="127.0.0.1"):
        self.target = (target_host, target_port)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.mode = "pass"
        self.lock = threading.Lock()
        self.pairs = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self):
        return "redis://127.0.0.1:%d/0" % self.port

    def stall(self):
        self.mode = "stall"

    def cut(self):
        with self.lock:
            self.mode = "cut"
            pairs, self.pairs = self.pairs, []
        for pair in pairs:
            for sock in pair:
                _close(sock)

    def restore(self):
        self.mode = "pass"

    def move(self, target_port, target_host="127.0.0.1"):
        self.target = (target_host, target_port)
        self.cut()
        self.restore()

    def close(self):
        self.closed = True
        self.cut()
        _close(self.listener)

    def _accept(self):
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.mode == "cut":
                _close(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=2)
            except OSError:
                _close(client)
                continue
            with self.lock:
                self.pairs.append((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src, dst):
        while not self.closed:
            if self.mode == "stall":
                select.select([], [], [], 0.02)
                continue
            try:
                ready, _, _ = select.select([src], [], [], 0.05)
                if not ready:
                    continue
                if self.mode == "stall":
                    continue
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
            except (OSError, ValueError):
                break
        _close(src)
        _close(dst)


def _close(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
