"""The operator's control socket: ``chat-server ctl users`` talks to a running server.

Like HAProxy's runtime API or ``redis-cli``: the main process listens on a
Unix socket, one per server (the port is in its name), and answers commands
by lines, so that ``socat - UNIX-CONNECT:PATH`` works by hand as well as the
``ctl`` client does. The parts:

* :mod:`.commands`: the command table (name, usage, one line of help): the
  one place a command is added;
* :mod:`.server`: the socket's framing as a sans-IO session, and the
  non-blocking server the supervisor runs inside its loop;
* :mod:`.client`: ``ctl``, the command line that sends one command (or a
  script of them on stdin) and turns the answer into an exit status.

What each command does is the supervisor's: the server hands it each
command line with a ``reply`` callable, to be called once, at once or in a
later turn of its loop.

The wire rules:

1. A command is one line, ended by LF or CRLF, in UTF-8. Blank lines are
   ignored.
2. Its answer is zero or more lines, then one last line: ``OK``, or
   ``ERR <reason>`` (the reason one hyphenated word, then maybe free text).
   A line of the answer that would read as a last one (``OK``, ``ERR``...)
   is sent with a space before it: user names may be ``OK`` or ``ERR``.
3. Commands on one connection are answered in order, one at a time: while
   one is being answered the next is not read, so memory stays bounded.
4. A line longer than :data:`~.server.MAX_LINE` bytes gets
   ``ERR line-too-long`` and the connection is closed; the rest of it is
   never read. A line that is not UTF-8 gets ``ERR bad-encoding``.
5. Output a client does not read is capped (:data:`~.server.MAX_OUTPUT`):
   past it the connection is dropped. Nothing ever blocks the main loop.
6. Beyond :data:`~.server.MAX_CONNECTIONS` connections at once, a new one
   gets ``ERR too-many-connections`` and is closed; one that says and reads
   nothing for :data:`~.server.IDLE_TIMEOUT` seconds gets
   ``ERR idle-timeout`` and is closed.
7. Only the server's own user (and root) may talk: the socket is 0600 in a
   directory of its own nobody else can write, and on Linux the peer's uid
   is checked too (``ERR permission-denied``).
"""
