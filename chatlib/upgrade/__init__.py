"""Upgrading the code with nobody logged out (``broker.py ctl upgrade``).

The main process stays (its PID, its listening sockets, its control
socket); every other process is replaced by one started from a fresh
interpreter, which reads the code now on disk, and every connection moves
into the new processes with all it carries. The supervisor drives the
steps (``Upgrade`` in ``chatlib.supervisor``); docs/ARCHITECTURE.md, "The
upgrade", says in which order and why nothing is lost. The parts here:

* ``probe``: the new code imported as a spawned child would import it,
  before anything starts;
* ``state``: a connection's state as versioned plain data;
* ``handover``: the socket pair that carries connections and their state
  from an old worker to a new one;
* ``relay``: the TLS sessions an old worker keeps, relayed to the new one.
"""
