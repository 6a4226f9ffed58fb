"""Upgrading the code with nobody logged out (``broker.py ctl upgrade``).

The main process stays (its PID, its listening sockets, its control socket);
every other process is replaced by one started from a fresh interpreter,
which reads the code now on disk. The switch, driven by the supervisor
(``chatlib.supervisor``, "the upgrade"), in the order that loses nothing:

1. ``probe``: the new code is imported in a throw-away interpreter; one that
   does not import, or cannot read the state the running workers hand over
   (``state.VERSION``), is refused before anything starts.
2. The successors start beside the running processes: workers with no
   clients, a broker on standby (not yet in the cluster), an acceptor that
   waits for its workers. One that fails refuses the upgrade; the running
   processes never knew.
3. The old acceptor stops: new connections wait in the listening socket's
   backlog, which the main process holds.
4. The old workers stop reading their clients (their output still goes
   out), and the old broker retires: it acknowledges everything it routed,
   and leaves without leaving the cluster. A worker's events it had not
   routed, and its clients' requests it had not answered, move with it.
5. Each old worker hands every connection to its successor over a socket
   pair (``handover``): the descriptor, and the connection's state as plain
   data (``state``): name, login order, a partial line, output not yet
   written, flood control, deadlines, counters. A TLS connection's session
   cannot leave the process that negotiated it: the old worker stays on as
   its relay (``relay``), and the successor gets the plaintext end.
6. The new broker begins: it learns the users from its workers, as a
   restarted broker does, and the new acceptor starts taking connections.
"""
