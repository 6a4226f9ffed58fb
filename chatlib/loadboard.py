"""Per-worker connection counts in shared memory, for the acceptor to balance by.

Each number has exactly one writer (its worker), so no lock is needed: the
acceptor only reads. Passed to processes as a start argument, it works under
every start method.
"""


class LoadBoard:
    def __init__(self, ctx, workers):
        self.live = ctx.RawArray("q", workers)       # connections a worker holds
        self.received = ctx.RawArray("q", workers)   # sockets it ever received

    def __len__(self):
        return len(self.live)
