"""The vocabulary of the worker <-> broker link.

A batch is a list of events, each a tuple whose first item is one of the tags
below. Batches travel through :class:`chatlib.channel.Channel`, one pickle per
batch. ``cid`` is a connection id, unique within one worker; the broker knows
a connection as ``(slot, cid)``, where ``slot`` is the worker's number.

Worker -> broker
    (SEQ, n)                    the events that follow are from the worker's
                                batch number ``n`` (numbers only grow, across
                                restarts of the worker too)
    (BROADCAST, blob)           ready-made ``MSG`` lines, to every other worker
    (LOGIN, cid, name, peer, password)
                                claim a name; answered by GRANTED or ANSWER.
                                ``peer``: (address, port, TLS or not), which
                                a cluster keeps for the operator's ``users``;
                                ``password``: the rest of the line, or None
    (REGISTER, cid, password, tls)
    (PASSWORD, cid, password, tls)
                                a logged-in user registers its name, or
                                changes its password; answered by ANSWER
    (WHO, cid)                  answered by ANSWER with the ``USER`` lines
    (DM, cid, key, line, awaited)
                                deliver ``line`` to user ``key`` (lower-case
                                name). ``awaited``: answered by ANSWER (empty,
                                or ``ERR user-not-found``). Otherwise the
                                worker's directory said the user exists and
                                nothing comes back, unless the user has just
                                left: then a DELIVER of the ERR line.
    (BYE, cid, name, stamp)     the connection is gone (``name`` None if it
                                never logged in)
    (SYNC, users, departed, cursor, listed, claims)
                                first event on a new link: the users this
                                worker holds, as [(cid, name, stamp), ...] (a
                                restarted broker learns them), those whose
                                BYE it is about to send again, the last
                                CURSOR it was told (None outside cluster
                                mode), the other users of this node its
                                directory lists, {key: name}, and the keys
                                of the LOGINs it sends again (a previous
                                broker may have granted them). Once all have
                                synced, a worker gets the INFO of each user
                                it listed whom nobody holds or claims: one on
                                a worker that died with the old broker

Broker -> worker
    (BROADCAST, blob)           lines for every logged-in user of this worker
                                (other workers' ``MSG`` lines, ``INFO`` lines)
    (DELIVER, cid, line)        a line for one connection (a ``DM``)
    (ANSWER, cid, data)         the answer to the connection's pending request
    (GRANTED, cid, name, stamp) the pending ``LOGIN`` succeeded; ``stamp``
                                orders logins for ``WHO`` across broker restarts
    (JOINED, key, name)         the directory: who is logged in anywhere, so a
    (LEFT, key)                 worker can send a ``DM`` without waiting for an
    (DIRECTORY, {key: name})    answer, and a restarted broker learns whom it
                                has heard of (SYNC); the whole of it after a
                                (re)start. ``name`` as typed; None for another
                                node's user. JOINED rides on the next batch,
                                always ahead of the user's lines (a name not
                                yet known only costs a DM a round trip); LEFT
                                is sent at once, with the departure's INFO
    (FROM, slot, n)             the BROADCAST and DELIVER events that follow come
                                from worker ``slot``'s batch ``n``; slot None:
                                from no batch (a dead worker's departures).
                                In cluster mode ``slot`` may also be a tuple:
                                (node, slot) for another node's worker, or
                                ("left", epoch) for departures read from the
                                cluster's stream, numbered by stream entry
    (CURSOR, entry_id)          cluster mode: the stream entries up to this
                                one are routed; a restarted broker resumes
                                reading after the oldest cursor of its workers
    (EVICT, line, cids, reason) cut these logged-in users (None: all) with
                                ``line``; ``reason`` is for the log and the
                                metrics: ``unavailable`` (cluster mode: the
                                node lost its lease), ``kicked`` (the operator)
    (MODERATION, moderation)    the chat's bans and mutes
                                (:class:`chatlib.moderation.Moderation`), whole,
                                after a change and on a new link: cut whoever
                                a ban matches, refuse what it forbids
    (LEASE, until)              cluster mode: the node's lease holds until
                                ``until`` (``time.monotonic()``, one clock for
                                every process of a host): run no logged-in
                                user's line after it, unless told a later one.
                                A node stopped past its lease (a freeze, a
                                paused VM) then serves its users nothing
                                before the broker has closed them
    (ACK, n)                    this worker's batches up to number ``n`` are
                                routed and their lines are in the kernel's
                                socket buffers: a broker killed now loses none

Nothing accepted from a client is lost with a broker, and nothing arrives
twice: a worker keeps the BROADCAST, DM and BYE events of every batch until it is
acknowledged, and sends the unacknowledged ones again to the next broker
under their old batch numbers (requests are sent again anyway). A receiving
worker drops BROADCAST and DELIVER events under a FROM it has seen before: per
sending worker, batches are routed in order, so the highest number seen
is all it needs to remember.

Every request (LOGIN, WHO, DM) gets exactly one answer, in order, so the
worker can hold the connection's later lines until it comes and keep each
client's answers in the order of its commands.
"""

BROADCAST = "M"
LOGIN = "L"
WHO = "W"
DM = "D"
BYE = "B"
SYNC = "S"
DELIVER = "V"
ANSWER = "A"
GRANTED = "G"
JOINED = "J"
LEFT = "X"
DIRECTORY = "Y"
ACK = "K"
SEQ = "N"
FROM = "F"
CURSOR = "C"
EVICT = "E"
LEASE = "T"
MODERATION = "O"
REGISTER = "R"
PASSWORD = "P"
