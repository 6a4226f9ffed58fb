"""The bus reader: one node's connection blocked reading the others' entries.

Every entry of the stream comes in order, ours included (skipped). Its
records go to the broker's :class:`chatlib.directory.Router`: other nodes'
lines under the batch that sent them, names that joined or left (kept in
``mirror``, the users logged in elsewhere), departures to announce. Where
reading resumes is the cursor: after the last entry read, or, for a
restarted broker, after the oldest entry its workers say they were given.
"""

import time

from chatlib.cluster import bus, registry
from chatlib.cluster.redis_client import RedisClient
from chatlib.cluster.resp import ConnectionLost, RedisError

READ_COUNT = 1000         # bus entries per read
READ_BLOCK = 1.0          # seconds a read waits for new entries
READ_RETRY = 1.0          # seconds before reading again after Redis refused a read


def entry_number(entry_id):
    """A bus entry id ``b"<ms>-<seq>"`` as one growing integer."""
    ms, _, seq = entry_id.partition(b"-")
    return int(ms) * 1000000 + int(seq or 0)


class BusReader:
    def __init__(self, address, sel, log, prefix, node, router):
        self.log = log
        self.prefix = prefix
        self.node_b = node.encode()
        self.router = router
        self.redis = RedisClient(address, sel, "redis-bus", on_up=self.read, log=log)
        self.started = False
        self.mirror = set()        # lower-case names logged in on other nodes
        self.cursor = None         # id of the last bus entry read
        self.worker_cursors = []   # what a restarted broker's workers were given
        self.reading = False
        self.read_again_at = None  # after Redis refused a read
        self.entries_in = 0        # bus entries read, ours included

    def start(self):
        """Once Redis first answered the node: an unreachable Redis is
        logged once, not once per connection."""
        if not self.started:
            self.started = True
            self.redis.start()

    def note_cursor(self, cursor):
        """A worker's SYNC: where this (restarted) broker's reading may resume."""
        if cursor is not None:
            self.worker_cursors.append(cursor)

    def resume(self, join_cursor):
        """Joined: read on after our workers' oldest cursor, else where the
        registry says (the last entry, for a new run of the node)."""
        if self.cursor is None:
            self.cursor = min(self.worker_cursors + [join_cursor], key=entry_number)
        self.read()

    def next_wakeup(self):
        wakeup = self.redis.next_wakeup()
        if self.read_again_at is None:
            return wakeup
        return self.read_again_at if wakeup is None else min(wakeup, self.read_again_at)

    def tick(self, now):
        self.redis.tick(now)
        if self.read_again_at is not None and now >= self.read_again_at:
            self.read_again_at = None
            self.read()

    def close(self):
        self.redis.close()

    def read(self):
        if self.reading or self.cursor is None or not self.redis.up:
            return
        self.reading = True
        self.redis.call(self.on_entries,
                        *registry.read_command(self.prefix, self.cursor, READ_COUNT,
                                               int(READ_BLOCK * 1000)),
                        block=READ_BLOCK)
        self.redis.flush()

    def on_entries(self, reply):
        self.reading = False
        if isinstance(reply, ConnectionLost):
            return                               # read() again when it is up
        if isinstance(reply, RedisError):
            self.log.error("cannot read the cluster's stream (trying again in %.0f s): %s",
                           READ_RETRY, reply)
            self.read_again_at = time.monotonic() + READ_RETRY
            return
        if reply:
            for _, entries in reply:
                for entry_id, fields in entries:
                    try:
                        self.route_entry(entry_id, fields)
                    except (ValueError, TypeError, IndexError) as exc:
                        self.log.error("skipping a malformed bus entry %r: %s", entry_id, exc)
                    self.cursor = entry_id
                    self.entries_in += 1
            self.router.tell_cursor(self.cursor)
        self.read()

    def route_entry(self, entry_id, fields):
        """Route one bus entry: lines to our users, changes to the directory.
        Anything else may have written to Redis: what does not parse is a
        ValueError, for the caller to skip the entry."""
        entry = dict(zip(fields[::2], fields[1::2]))
        if entry.get(b"o") == self.node_b:
            return                               # our own
        router = self.router
        if b"d" in entry:
            node = entry.get(b"o", b"?").decode()
            origin = None
            for record in bus.decode(entry[b"d"]):
                if record[0] == bus.ORIGIN:
                    _, slot, number = record
                    origin = ((node, slot), number)
                elif record[0] == bus.BROADCAST:
                    router.remote_lines(origin, record[1])
                elif record[0] == bus.DM:
                    _, key, line = record
                    router.remote_dm(origin, key, line)
        for key in _names(entry.get(b"j")):
            self.mirror.add(key)
            router.remote_joined(key)
        for key in _names(entry.get(b"q")):
            self.mirror.discard(key)
            router.remote_left(key)
        names = _names(entry.get(b"l"))
        if names:
            for name in names:
                self.mirror.discard(name.lower())
            router.remote_departures(names, entry_number(entry_id))
        if b"c" in entry:
            router.remote_control(bus.decode_control(entry[b"c"]), entry_number(entry_id))


def _names(field):
    return [n for n in (field or b"").decode().split("\n") if n]
