"""The vocabulary of the worker <-> broker link.

A batch is a list of events, each a tuple whose first item is one of the tags
below. Batches travel through :class:`chatlib.channel.Channel`, one pickle per
batch. ``cid`` is a connection id, unique within one worker; the broker knows
a connection as ``(slot, cid)``, where ``slot`` is the worker's number.

Worker -> broker
    (MSG, blob)                 ready-made ``MSG`` lines, to every other worker
    (LOGIN, cid, name)          claim a name; answered by GRANTED or ANSWER
    (WHO, cid)                  answered by ANSWER with the ``USER`` lines
    (DM, cid, key, line)        deliver ``line`` to user ``key`` (lower-case
                                name); answered by ANSWER (empty, or an ERR)
    (BYE, cid)                  the connection is gone
    (SYNC, [(cid, name, stamp), ...])
                                first event on a new link: the users this
                                worker holds (a restarted broker learns them)

Broker -> worker
    (MSG, blob)                 lines for every logged-in user of this worker
                                (other workers' ``MSG`` lines, ``INFO`` lines)
    (DELIVER, cid, line)        a line for one user (a ``DM``)
    (ANSWER, cid, data)         the answer to the connection's pending request
    (GRANTED, cid, name, stamp) the pending ``LOGIN`` succeeded; ``stamp``
                                orders logins for ``WHO`` across broker restarts

Every request (LOGIN, WHO, DM) gets exactly one answer, in order, so the
worker can hold the connection's later lines until it comes and keep each
client's answers in the order of its commands.
"""

MSG = "M"
LOGIN = "L"
WHO = "W"
DM = "D"
BYE = "B"
SYNC = "S"
DELIVER = "V"
ANSWER = "A"
GRANTED = "G"
