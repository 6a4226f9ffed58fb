"""Does the code now on disk start, and can it read what the running
workers hand over? Asked of a throw-away interpreter before an upgrade
starts anything, so that a syntax error or a missing module is an ``ERR``
with its reason, and the running processes never know.

The interpreter is prepared exactly as ``spawn`` prepares a child (the
same ``sys.path``, directory and main module, which is run as
``__mp_main__``), then imports what the children import, and prints what
it found as one JSON line.
"""

import importlib
import json
import os
import subprocess
import sys
from multiprocessing import spawn

TIMEOUT = 20.0
# What every child imports, whatever its role; the entry point's two
# modules come from where the supervisor found them.
MODULES = ("chatlib.service", "chatlib.acceptor", "chatlib.upgrade.state",
           "chatlib.upgrade.handover", "chatlib.upgrade.relay")


def start(modules):
    """A running probe (``subprocess.Popen``: its stdout says, once it ends)
    that also imports ``modules``."""
    data = spawn.get_preparation_data("probe")
    data.pop("authkey", None)
    data["modules"] = list(MODULES) + [m for m in modules if m != "__main__"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in data["sys_path"] if p))
    proc = subprocess.Popen([sys.executable, "-c", "from chatlib.upgrade.probe import main; main()"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=data.get("dir") or None)
    proc.stdin.write(json.dumps(data).encode())
    proc.stdin.close()
    return proc


def outcome(proc):
    """``(found, None)`` or ``(None, reason)`` of a probe that ended."""
    out = proc.stdout.read()
    err = proc.stderr.read().decode(errors="replace").strip().splitlines()
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    if proc.returncode != 0:
        return None, (err[-1] if err else "exit status %d" % proc.returncode)
    try:
        found = json.loads(out)
        return {key: found[key] for key in ("version", "reads", "writes")}, None
    except (ValueError, KeyError, TypeError):
        return None, "the new code's probe said nothing readable"


def main():
    data = json.load(sys.stdin)
    spawn.prepare({key: value for key, value in data.items() if key != "modules"})
    for module in data["modules"]:
        importlib.import_module(module)
    from chatlib import __version__
    from chatlib.upgrade import state
    json.dump({"version": __version__, "reads": list(state.READS), "writes": state.VERSION},
              sys.stdout)
