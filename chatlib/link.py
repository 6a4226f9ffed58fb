"""The vocabulary of the worker <-> broker link.

A batch is a list of events, each a tuple whose first item is one of the tags
below. Batches travel through :class:`chatlib.channel.Channel`, one pickle per
batch. ``cid`` is a connection id, unique within one worker; the broker knows
a connection as ``(slot, cid)``, where ``slot`` is the worker's number.

Worker -> broker
    (MSG, blob)                 ready-made ``MSG`` lines, to every other worker
    (LOGIN, cid, name)          claim a name; answered by GRANTED or ANSWER
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
    (SYNC, [(cid, name, stamp), ...])
                                first event on a new link: the users this
                                worker holds (a restarted broker learns them),
                                and those whose BYE it is about to resend

Broker -> worker
    (MSG, blob)                 lines for every logged-in user of this worker
                                (other workers' ``MSG`` lines, ``INFO`` lines)
    (DELIVER, cid, line)        a line for one connection (a ``DM``)
    (ANSWER, cid, data)         the answer to the connection's pending request
    (GRANTED, cid, name, stamp) the pending ``LOGIN`` succeeded; ``stamp``
                                orders logins for ``WHO`` across broker restarts
    (JOINED, key) / (LEFT, key) the directory: who is logged in anywhere, so a
    (DIRECTORY, [key, ...])     worker can send a ``DM`` without waiting for an
                                answer; the whole of it after a (re)start
    (ACK, n)                    the first ``n`` batches this worker sent on
                                this link are routed and their lines are in
                                the kernel's socket buffers: a broker killed
                                now loses none of them

Nothing accepted from a client is lost with a broker: a worker keeps the
MSG, DM and BYE events of every batch until it is acknowledged, and sends the
unacknowledged ones again to the next broker (requests are sent again anyway).

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
JOINED = "J"
LEFT = "X"
DIRECTORY = "Y"
ACK = "K"
