"""What happened when: the run's clock, its ticks, its counts and its
violations; and the summary printed at the end."""

import time
from collections import Counter, defaultdict

SHOWN = 25              # violations printed per kind; the rest are counted


class Journal:
    """``tick`` orders the checker's own events: a line queued with a tick
    above a user's ``ok_tick`` was sent after that user saw its ``OK``."""

    def __init__(self):
        self.t0 = time.monotonic()
        self.tick = 0
        self.counts = Counter()
        self.violations = defaultdict(list)   # kind -> messages
        self.lines_hit = defaultdict(set)     # "lost"/"duplicate" -> (kind, sender, number)

    def next_tick(self):
        self.tick += 1
        return self.tick

    def now(self):
        """Seconds since the load started."""
        return time.monotonic() - self.t0

    def say(self, text):
        print("[%7.2f s] %s" % (self.now(), text), flush=True)

    def violation(self, kind, text, blame=None):
        """Record a broken promise; ``blame``: the kill it most likely follows from."""
        if blame is not None:
            blame.blamed[kind] += 1
        self.violations[kind].append(text)
        if len(self.violations[kind]) <= SHOWN:
            self.say("VIOLATION %s: %s" % (kind, text))

    def summary(self, args, kills, roles):
        """Print what was done and found; the exit status (1: violations)."""
        c = self.counts
        by_role = Counter(k.role for k in kills)
        cluster = bool(args.cluster)
        print("\n== chaos summary ==")
        print("seed %d, %.0f s of load, %s%d workers, %d clients, kill interval %.1f s"
              % (args.seed, args.duration, "%d nodes of " % args.cluster if cluster else "",
                 args.workers, args.clients, args.interval))
        print("kills: %d (%s)" % (len(kills), ", ".join(
            "%s %d" % (role, by_role[role]) for role in roles)))
        for k in kills:
            print("  %s: replaced in %s%s%s" % (
                k, "%.2f s" % k.replaced_in if k.replaced_in is not None else "NEVER",
                ", %d connections lost with it" % len(k.cut) if k.role in ("worker", "node")
                else "", "".join("; %d %s violations" % (n, kind)
                                 for kind, n in sorted(k.blamed.items()))))
        print("sent: %d MSG, %d DM, %d WHO; received: %d MSG, %d DM, %d INFO"
              % (c["MSG sent"], c["DM sent"], c["WHO sent"], c["MSG received"],
                 c["DM received"], c["INFO received"]))
        print("connections lost: %d (all to worker or node kills unless a 'cut' violation "
              "says otherwise); DMs told user-not-found: %d"
              % (c["connections lost"], c["DM told user-not-found"]))
        print("duplicate LOGINs: %d tried, %d refused, %d granted"
              % (c["duplicate LOGINs tried"], c["duplicate LOGINs refused"],
                 c["duplicate LOGINs granted"]))
        if cluster:
            print("across nodes: %d lines lost with Redis, %d requests told ERR unavailable "
                  "(both allowed around a Redis restart)"
                  % (c["lines lost with Redis"], c["requests told ERR unavailable"]))
        if not self.violations:
            print("RESULT: PASS")
            return 0
        print("RESULT: FAIL, %d violations: %s" % (
            sum(map(len, self.violations.values())),
            ", ".join("%s %d%s" % (k, len(v), " (%d distinct lines sent)" % len(self.lines_hit[k])
                                   if k in self.lines_hit else "")
                      for k, v in sorted(self.violations.items()))))
        for kind, texts in sorted(self.violations.items()):
            for text in texts[:SHOWN]:
                print("  %s: %s" % (kind, text))
            if len(texts) > SHOWN:
                print("  %s: ... and %d more" % (kind, len(texts) - SHOWN))
        return 1
