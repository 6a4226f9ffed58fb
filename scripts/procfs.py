"""What Linux's /proc says about a server's processes, for the tools and tests.

Every server process runs in the session its main process leads (the tools
and tests start it with a new session), so the session id finds them all,
including those a ``forkserver`` started; each names its role in its title.
"""

import os


def session_pids(sid):
    """Pids of the live processes of session ``sid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(entry))
    return pids


def process_role(pid):
    """The title a server process gave itself (``chat-worker-1`` ...), or None."""
    try:
        with open("/proc/%d/comm" % pid) as f:
            return f.read().strip()
    except OSError:
        return None
