"""The control socket's commands: what each is called, takes and does.

Data only: the table feeds ``help``, ``ctl --help`` and the check of a name;
what a command does is the supervisor's. Adding a command is adding one
entry. A command with sub-commands (``account add NAME``, ``account
password NAME``) takes one entry per form, all under the same name.
"""

from typing import NamedTuple


class Command(NamedTuple):
    usage: str            # as typed: the name, then its arguments
    description: str      # one line

    @property
    def name(self):
        return self.usage.split(None, 1)[0]


COMMANDS = (
    Command("help", "this list"),
    Command("users", "one line per logged-in user of the whole chat, oldest login first"),
    Command("kick NAME [REASON]", "close NAME's connection with ERR kicked"),
    Command("ban TARGET [DURATION] [REASON]",
            "ban a name, an address or a CIDR block "
            "(DURATION: 30m, 12h, 7d; none: until unbanned)"),
    Command("unban TARGET", "lift the ban on TARGET"),
    Command("bans", "list bans with expiry and reason"),
    Command("mute NAME [DURATION]", "NAME's MSG and DM reach nobody"),
    Command("unmute NAME", "NAME's MSG and DM are delivered again"),
    Command("announce TEXT", "every user gets NOTICE TEXT"),
    Command("stats", "the statistics, one `name value` per line"),
    Command("metrics", "the statistics in the Prometheus text format"),
    Command("reload", "reopen the log file and reload the TLS certificate, as SIGHUP does"),
    Command("account add NAME", "register NAME (ctl asks for its password)"),
    Command("account password NAME", "set NAME's password (ctl asks for it)"),
    Command("account remove NAME", "NAME is not registered any more (its user stays on)"),
    Command("accounts", "registered names, when created, when last logged in"),
    Command("upgrade [OPTIONS]", "load the code on disk into new processes and move every "
            "connection to them; OPTIONS: server options to change (--workers 8)"),
    Command("version", "the version running, since when, and how many upgrades"),
)

# The commands the main process answers alone, even while an upgrade
# switches processes (the others need the broker or the workers).
ANSWERED_BY_MAIN = frozenset(("help", "stats", "metrics", "version", "upgrade"))

# The commands whose last argument is a password, which ctl reads itself:
# never on its command line, where ps shows it to every user of the host.
_SECRET_FORMS = (("account", "add"), ("account", "password"))


def takes_secret(words):
    """Does the command ``words`` (as typed, no password yet) need a password?"""
    return tuple(word.lower() for word in words[:2]) in _SECRET_FORMS and len(words) >= 3

_NAMES = frozenset(command.name for command in COMMANDS)


def split(line):
    """``(name, rest)`` of a command line: the name lower-cased, the rest
    stripped (``""`` when there is none)."""
    parts = line.strip().split(None, 1)
    if not parts:
        return "", ""
    return parts[0].lower(), parts[1].strip() if len(parts) > 1 else ""


def known(name):
    """Whether ``name`` (lower case, as :func:`split` gives it) is a command."""
    return name in _NAMES


def help_lines():
    """The answer to ``help``: each usage, then its description, aligned."""
    width = max(len(command.usage) for command in COMMANDS)
    return ["%-*s  %s" % (width, command.usage, command.description)
            for command in COMMANDS]
