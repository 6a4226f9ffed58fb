"""State kept on disk: small JSON files, written whole or not at all.

The one place that writes files of state (bans and mutes now, accounts
later), so that every one is written the same safe way: a new file is
written beside the old one, synced, then renamed over it, and the
directory synced, so that a crash at any moment leaves the old content or
the new, never half of either. Files and directory are the owner's alone
(0600, 0700): a ban's reason or an account is nobody else's business.
"""

import json
import os

_APP = "chat-server"


class StateFileError(ValueError):
    """A state file that cannot be used; the message names the file and
    says what is wrong, so that the server can stop with one clear line."""


def load_json(path):
    """The object in the JSON file ``path``, or None if there is no such file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        why = (e.strerror or str(e)).lower()
        raise StateFileError("%s: unreadable: %s" % (path, why)) from None
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise StateFileError("%s: not UTF-8, at byte %d" % (path, e.start)) from None
    except json.JSONDecodeError as e:
        raise StateFileError("%s: not JSON, at line %d column %d: %s"
                             % (path, e.lineno, e.colno, e.msg)) from None


def save_json(path, obj):
    """Write ``obj`` as JSON to ``path``, atomically; creates the directory
    (0700) if need be. An object JSON cannot encode fails before any file
    is touched."""
    data = json.dumps(obj, indent=1, allow_nan=False).encode() + b"\n"
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    # Beside the file, so that the rename stays in one file system. Private
    # from its creation (not chmod later), and never an existing file.
    temporary = os.path.join(directory, ".%s.%s.tmp" % (os.path.basename(path),
                                                        os.urandom(6).hex()))
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    _sync_directory(directory)


def _sync_directory(directory):
    """Make a rename in ``directory`` durable: until the directory itself is
    synced, a crash may bring the old name back."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def default_state_dir(port):
    """Where a server listening on ``port`` keeps its state by default:
    systemd's ``$STATE_DIRECTORY`` (``StateDirectory=``; the first if there
    are several), else ``$XDG_STATE_HOME/chat-server/<port>``, else
    ``~/.local/state/chat-server/<port>``. The port is in the path so that two
    servers on one host never share bans by accident; a systemd unit has a
    directory of its own already."""
    systemd = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if systemd:
        return systemd
    base = os.environ.get("XDG_STATE_HOME", "")
    if not os.path.isabs(base):      # the XDG spec: a relative path is invalid, ignored
        base = os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, _APP, str(port))


def check_version(obj, version):
    """A state file's object is a JSON object of ``version``; ValueError
    saying which it is not."""
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    if obj.get("version") != version:
        raise ValueError("version %r: this server reads version %d" % (obj.get("version"), version))
