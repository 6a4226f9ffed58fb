"""The seam between the broker and the users' name space: the directory.

The broker routes between its workers and holds the users logged in on this
host; whatever decides names beyond that (claiming one, releasing it,
answering ``WHO``, finding a ``DM``'s target elsewhere, carrying broadcasts
to other hosts) is a directory, which the broker calls through the methods
of :class:`LocalDirectory`. There are two:

* :class:`LocalDirectory`: one host, where the broker's own user list is the
  whole name space, so every call is answered at once;
* :class:`chatlib.cluster.node.Cluster`: a node of a cluster, where Redis
  decides, and answers come later.

A directory calls the broker back only through :class:`Router`, never by
reaching into it.
"""

import time
from collections import namedtuple

from chatlib import protocol

User = namedtuple("User", "name slot cid stamp")
User.__doc__ = "A user logged in on this host: name as typed, worker, connection, login stamp."


class Router:
    """What a directory may ask of the broker (which implements it)."""

    def local_users(self):
        """This host's users, in login order (:class:`User` values by
        lower-case name)."""
        raise NotImplementedError

    def all_synced(self):
        """Has every worker told a (restarted) broker whom it holds?"""
        raise NotImplementedError

    def grant(self, slot, cid, name, stamp):
        """The name is the connection's: it is logged in."""
        raise NotImplementedError

    def answer(self, slot, cid, data):
        """The answer to the connection's pending request (``OK`` is a grant)."""
        raise NotImplementedError

    def who_lines(self):
        """The ``USER`` lines of this host's users, in login order."""
        raise NotImplementedError

    def latest_stamp(self):
        """The last login stamp given on this host (a restarted broker
        learns it from its workers)."""
        raise NotImplementedError

    # What only a cluster node's directory calls.

    def report_ready(self):
        """Joined: the supervisor may say ``listening on``."""
        raise NotImplementedError

    def fatal(self, message):
        """A condition no restart can cure (a duplicate node id): stop."""
        raise NotImplementedError

    def joined(self):
        """The first JOIN checked this host's users: route what waited for it."""
        raise NotImplementedError

    def vouch(self, until):
        """The lease holds until ``until`` (``time.monotonic()``)."""
        raise NotImplementedError

    def evict(self, keys=None, drop_lines=False):
        """Close these users (None: all) with ``ERR unavailable``."""
        raise NotImplementedError

    def directory_changed(self):
        """Every worker gets the whole directory again (:meth:`others` changed)."""
        raise NotImplementedError

    def remote_lines(self, origin, blob):
        """Another node's ``MSG`` lines, from its batch ``origin``."""
        raise NotImplementedError

    def remote_dm(self, origin, key, line):
        """Another node's ``DM`` line for ``key``."""
        raise NotImplementedError

    def remote_joined(self, key):
        raise NotImplementedError

    def remote_left(self, key):
        raise NotImplementedError

    def remote_departures(self, names, number):
        """Users gone from other nodes, announced by bus entry ``number``."""
        raise NotImplementedError

    def tell_cursor(self, cursor):
        """The bus entries up to ``cursor`` are routed."""
        raise NotImplementedError

    def remote_control(self, records, number):
        """The operator's commands made on another node (``kick``,
        ``announce``, changes of the bans and mutes: see :meth:`LocalDirectory.control`),
        from bus entry ``number``."""
        raise NotImplementedError

    def restore_state(self, kind, ops, kept):
        """Joined: the bans and mutes (``kind`` "moderation") or the
        accounts ("account") Redis holds (``ops``); ``kept``: Redis had lost
        them, and this node's are the chat's again. Returns the ops to give
        back to Redis, or None."""
        raise NotImplementedError


class LocalDirectory:
    """One host: the broker's user list is every user there is."""

    def __init__(self, router):
        self.router = router

    ready_at_start = True      # nothing to join before serving
    routes_at_once = True      # nothing to check a restarted broker's users against
    congested = False          # nothing waits to go anywhere

    def start(self):
        pass

    def leave(self, done):
        done()

    def close(self):
        pass

    def figures(self):
        """For the statistics line: nothing beyond the broker's own."""
        return None

    def next_wakeup(self):
        return None

    def tick(self, now):
        pass

    def check_lease(self):
        pass

    def synced(self):
        pass

    def note_cursor(self, cursor):
        pass

    def others(self):
        """Keys of the users logged in elsewhere."""
        return ()

    def knows(self, key):
        """Is ``key`` logged in elsewhere?"""
        return False

    def claim(self, slot, cid, name, peer):
        """``LOGIN`` of a name nobody on this host holds: granted, stamped
        after every login before it (clocks can step back). ``peer``:
        (address, port, TLS or not), for the operator's ``users``."""
        self.router.grant(slot, cid, name,
                          max(time.time_ns(), self.router.latest_stamp() + 1))

    def release(self, key, slot, cid, announce=True):
        pass

    def cancel(self, slot, cid=None):
        pass

    def who(self, slot, cid):
        self.router.answer(slot, cid, self.router.who_lines())

    def find_dm(self, slot, cid, key, line):
        """A ``DM`` to a name nobody holds, its sender waiting for the answer."""
        self.router.answer(slot, cid, protocol.ERR_USER_NOT_FOUND)

    def forward_dm(self, slot, number, key, line):
        """A ``DM`` to ``key``, logged in elsewhere (never, on one host)."""

    def publish(self, slot, number, blob):
        """A worker's batch ``number`` had these ``MSG`` lines: nobody else to tell."""

    def end_turn(self, received):
        pass

    def control(self, records):
        """The operator's commands for the other nodes: ``("kick", key,
        reason)``, ``("announce", text)``, ``("moderation", op)`` (a change
        of the bans and mutes, :meth:`chatlib.moderation.Moderation.apply`).
        On one host there are none."""

    def check_guess(self, group, key, callback):
        """``callback(allowed)``: may a password be checked for ``key``
        from the address group ``group``? On one host the broker's own
        throttle said so already; a cluster asks every node's failures."""
        callback(True)

    def guess_failed(self, group, key):
        """A wrong password for ``key`` from ``group``: for the other nodes'
        throttles (on one host, nobody else)."""

    def user_rows(self, callback):
        """``callback(rows)``: the users of the other nodes, as
        :class:`chatlib.control.users.UserRow` (none, on one host)."""
        callback([])

    def acknowledgeable(self, received):
        """Worker slot -> the last batch whose lines nobody else must still
        get: all that were routed."""
        return received
