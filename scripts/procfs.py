"""What Linux's /proc says about a server's processes, for the tools and tests.

Every server process runs in the session its main process leads (the tools
and tests start it with a new session), so the session id finds them all,
including those a ``forkserver`` started; each names its role in its title.
"""

import os
import resource

# Fields of stat(pid), numbered from the state (proc(5) numbers them from
# the pid: add 3).
STATE, PPID, SID, UTIME, STIME, STARTTIME, RSS = 0, 1, 3, 11, 12, 19, 21


def stat(pid):
    """The fields of ``/proc/PID/stat`` after the command (state first), or None."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(b")") + 2:].split()


def _table():
    """(pid, ppid, sid) of every live process."""
    rows = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = stat(int(entry))
            if fields and fields[STATE] != b"Z":
                rows.append((int(entry), int(fields[PPID]), int(fields[SID])))
    return rows


def session_pids(sid):
    """Pids of the live processes of session ``sid``."""
    return [pid for pid, _, s in _table() if s == sid]


def children(parent):
    """Pids of the live processes whose parent is ``parent``."""
    return [pid for pid, ppid, _ in _table() if ppid == parent]


def process_tree(root):
    """``root``'s session if it leads one (a spawned server), else its descendants.

    A session also holds processes a forkserver started, which are not
    descendants of the server's main process.
    """
    table = _table()
    if any(pid == root and sid == root for pid, _, sid in table):
        return [pid for pid, _, sid in table if sid == root]
    tree, i = [root], 0
    while i < len(tree):
        tree.extend(pid for pid, ppid, _ in table if ppid == tree[i])
        i += 1
    return tree


def usage(roots):
    """(CPU seconds, RSS bytes) summed over the process trees of ``roots``;
    None without /proc or a root."""
    roots = [r for r in roots if r]
    if not roots or not os.path.isdir("/proc"):
        return None
    ticks = rss_pages = 0
    for root in roots:
        for pid in process_tree(root):
            fields = stat(pid)
            if fields:
                ticks += int(fields[UTIME]) + int(fields[STIME])
                rss_pages += int(fields[RSS])
    return ticks / os.sysconf("SC_CLK_TCK"), rss_pages * resource.getpagesize()


def cpu_ticks(pid):
    """User and system CPU ``pid`` has used, in clock ticks; None if it is gone."""
    fields = stat(pid)
    return int(fields[UTIME]) + int(fields[STIME]) if fields else None


def state(pid):
    """``pid``'s state letter (``R``, ``S``, ``T`` for stopped...), or None."""
    fields = stat(pid)
    return fields[STATE].decode() if fields else None


def cpu_wait(pid="self"):
    """Seconds ``pid`` has waited for a CPU while it could run (0.0 where
    the kernel does not say)."""
    try:
        with open("/proc/%s/schedstat" % pid) as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


def process_age(pid):
    """Seconds since ``pid`` started; 0 if it is gone."""
    fields = stat(pid)
    try:
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except OSError:
        return 0.0
    return uptime - int(fields[STARTTIME]) / os.sysconf("SC_CLK_TCK") if fields else 0.0


def process_role(pid):
    """The title a server process gave itself (``chat-worker-1`` ...), or None."""
    try:
        with open("/proc/%d/comm" % pid) as f:
            return f.read().strip()
    except OSError:
        return None


def tcp_sockets():
    """(local port, remote port, state, inode) of every TCP socket, from
    ``/proc/net/tcp`` and ``tcp6``; state ``0A`` is LISTEN."""
    rows = []
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            rows.append((int(fields[1].rsplit(":", 1)[1], 16),
                         int(fields[2].rsplit(":", 1)[1], 16), fields[3], fields[9]))
    return rows


def socket_inodes(pid):
    """The inodes of the sockets process ``pid`` holds."""
    held = set()
    try:
        fds = os.listdir("/proc/%d/fd" % pid)
    except OSError:
        return held
    for fd in fds:
        try:
            target = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            continue
        if target.startswith("socket:["):
            held.add(target[8:-1])
    return held
