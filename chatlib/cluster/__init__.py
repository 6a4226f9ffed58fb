"""Cluster mode (``--redis``): several hosts sharing one chat through Redis.

Optional, and reached through one door: the broker of a node started with
``--redis`` makes a :class:`chatlib.cluster.node.Cluster`; nothing else in
the server imports this package. Its parts, from the wire up:

* :mod:`.resp`: the Redis protocol (RESP2), sans-IO;
* :mod:`.redis_client`: one non-blocking, pipelined, reconnecting connection
  on the broker's selector;
* :mod:`.registry`: the cluster's keys in Redis and the Lua scripts that
  change them atomically (names, leases, the bus);
* :mod:`.bus`: the records one node's stream entries carry to the others;
* :mod:`.publisher`: what a node sends Redis, one entry per turn, in order,
  sent again after a reconnect;
* :mod:`.reader`: the connection that reads the others' entries;
* :mod:`.lease`: the node's lease as it keeps time of it;
* :mod:`.requests`: clients waiting for Redis, each answered once, in time;
* :mod:`.node`: the node's side of it all, beside the broker (joining,
  renewing and fencing, what each request does).
"""
