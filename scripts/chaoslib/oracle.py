"""The promises a chaos run checks: each line as it arrives, and all of
them once the load has stopped and everything sent has arrived.

* per sender, receiver and kind (MSG, DM), the numbers received go up by
  one: no duplicate, no gap; and all a sender sent after the receiver's
  ``OK`` arrives, but for the tail of a sender whose connection died;
* every user that left is announced exactly once to every survivor that
  had logged in before, after its last ``MSG``, and nobody still there is;
* no ``WHO`` lists a name twice, or a user its asker was told had left, or
  misses a user logged in before it who never left; a ``LOGIN`` of a held
  name gets ``ERR username-taken``;
* afterwards a new session works, every killed process has exactly one
  replacement, and the server logged no traceback.

Across the nodes of a cluster, lines between two nodes sent within a moment
of a Redis restart may be lost (they lived in Redis), and a dead node's
users are announced once its lease has run out.
"""

from collections import Counter

SLACK = 3.0             # on top of a promised delay, for a machine busy with other work
IN_REDIS = (2.0, 1.0)   # lines between nodes sent this long before (after) a Redis
                        # restart may be lost with it


class Oracle:
    def __init__(self, args, journal, clients, faults, logins, nodes):
        self.args = args
        self.journal = journal
        self.clients = clients
        self.faults = faults
        self.logins = logins
        self.nodes = nodes
        self.cluster = bool(args.cluster)
        self.who_missing = []       # (asker, answered at, names it lacked)

    def may_be_lost(self, s, r, at):
        """A line between two nodes sent at ``at`` may have been lost with Redis."""
        return s.node != r.node and self.faults.near_redis_restart(at, *IN_REDIS)

    # -- as lines arrive ----------------------------------------------------------

    def on_chat(self, r, kind, sender, text):
        """Check one MSG/DM line against what its sender sent, and its stream so far."""
        journal, faults, where = self.journal, self.faults, self.logins.where
        journal.counts[kind + " received"] += 1
        s = self.clients.users.get(sender)
        prefix = "m" if kind == "MSG" else "d"
        sent = None
        if s is not None and text[:1] == prefix and text[1:].isdigit():
            sent = s.msgs if kind == "MSG" else s.dms.get(r.name, ())
            seq = int(text[1:])
        if not sent or not 1 <= seq <= len(sent) or (kind == "MSG" and s is r):
            journal.violation("corrupt", "%s got %s %s %s, which was never sent to it"
                              % (r.name, kind, sender, text))
            return
        if r.infos[sender]:
            journal.violation("order", "%s got %s %s %s after INFO %s disconnected"
                              % (r.name, kind, sender, text, sender))
        span = r.got.get((sender, kind))
        if span is None:
            r.got[(sender, kind)] = [seq, seq]
        elif seq <= span[1]:
            journal.lines_hit["duplicate"].add((kind, sender, seq))
            before = [k for k in faults.kills if k.at <= journal.now()]
            journal.violation("duplicate", "%s got %s %s #%d again or out of order (after #%d; "
                              "%s -> %s): %s" % (r.name, kind, sender, seq, span[1], where(sender),
                                                 where(r.name), faults.kills_around(journal.now())),
                              before[-1] if before else None)
        else:
            if seq > span[1] + 1:
                self.report_loss(s, r, kind, span[1] + 1, seq - 1, "then #%d arrived" % seq)
            span[1] = seq

    def report_loss(self, s, r, kind, lo, hi, how):
        journal, faults = self.journal, self.faults
        sent = s.msgs if kind == "MSG" else s.dms[r.name]
        lost = [n for n in range(lo, hi + 1) if not self.may_be_lost(s, r, sent[n - 1][1])]
        journal.counts["lines lost with Redis"] += hi - lo + 1 - len(lost)
        if not lost:
            return
        lo, hi = lost[0], lost[-1]
        first_at, last_at = sent[lo - 1][1], sent[hi - 1][1]
        numbers = "#%d" % lo if lo == hi else "#%d-#%d" % (lo, hi)
        journal.lines_hit["lost"].update((kind, s.name, n) for n in range(lo, hi + 1))
        after = [k for k in faults.kills if k.at >= first_at] or faults.kills[-1:]
        journal.violation("lost", "%s %s->%s %s lost (%s -> %s; sent at %.2f-%.2f s, %s): %s"
                          % (kind, s.name, r.name, numbers, self.logins.where(s.name),
                             self.logins.where(r.name), first_at, last_at, how,
                             faults.kills_around(first_at)),
                          after[0] if after else None)
        journal.counts["lines lost"] += hi - lo + 1

    def on_info(self, r, name):
        journal = self.journal
        journal.counts["INFO received"] += 1
        r.infos[name] += 1
        if r.infos[name] > 1:
            journal.violation("info", "%s got INFO %s disconnected %d times"
                              % (r.name, name, r.infos[name]))
        else:
            r.info_tick[name] = journal.tick
            r.info_at[name] = journal.now()

    def check_who(self, r, sent_tick, names):
        if names is None:
            return
        journal, users = self.journal, self.clients.users
        journal.counts["WHO answers checked"] += 1
        seen = Counter(n.lower() for n in names)
        twice = sorted(n for n, c in seen.items() if c > 1)
        if twice:
            journal.violation("who", "%s's WHO lists %s more than once"
                              % (r.name, ", ".join(twice)))
        if r.name not in names:
            journal.violation("who", "%s's WHO leaves out %s itself" % (r.name, r.name))
        told = [n for n in names if r.info_tick.get(n, sent_tick) < sent_tick]
        if told:
            journal.violation("who", "%s's WHO lists %s, announced as disconnected before"
                              % (r.name, ", ".join(told)))
        unknown = [n for n in names if n not in users]
        if unknown:
            journal.violation("who", "%s's WHO lists unknown %s" % (r.name, ", ".join(unknown)))
        listed = set(names)
        missing = [u.name for u in users.values() if u.state == "in"
                   and u.ok_tick < sent_tick and u.name not in listed]
        if missing:
            self.who_missing.append((r.name, journal.now(), missing))

    # -- at the end ---------------------------------------------------------------

    def streams(self):
        """(sender, receiver, kind, what was sent, the numbers due) of every
        stream to a survivor: what a sender sent after the receiver's OK."""
        for r in self.clients.live():
            for s in self.clients.users.values():
                if s.probe_of is not None:
                    continue
                for kind, sent in (("MSG", s.msgs if s is not r else []),
                                   ("DM", s.dms.get(r.name, []))):
                    due = [i + 1 for i, (tick, _) in enumerate(sent) if tick > r.ok_tick]
                    if due:
                        yield s, r, kind, sent, due

    def streams_complete(self):
        """Has the last line due from every live sender come (but lines that
        may have been lost with Redis)?"""
        for s, r, kind, sent, due in self.streams():
            last = max((n for n in due if not self.may_be_lost(s, r, sent[n - 1][1])),
                       default=0)
            if s.state == "in" and r.got.get((s.name, kind), (0, 0))[1] < last:
                return False
        return True

    def check_all(self):
        self.check_streams()
        self.check_infos()
        self.check_names()
        self.check_final_session()
        self.check_processes()
        self.check_log()

    def check_streams(self):
        """Everything sent to a survivor after its OK arrived, but a dead sender's tail."""
        streams = tails = 0
        for s, r, kind, sent, due in self.streams():
            streams += 1
            first, last = r.got.get((s.name, kind), (None, None))
            if first is None:
                lo = due[0]
            elif first > due[0]:
                self.report_loss(s, r, kind, due[0], first - 1, "the stream began at #%d"
                                 % first)
                lo = last + 1
            else:
                lo = last + 1
            if lo <= due[-1]:
                if s.state == "in":
                    self.report_loss(s, r, kind, lo, due[-1], "never arrived")
                else:
                    tails += 1
        counts = self.journal.counts
        counts["streams checked"] = streams
        self.journal.say("check: %d (sender, receiver, kind) streams to %d survivors; %d dead "
                         "senders' tails cut short (allowed)%s" % (
                             streams, len(self.clients.live()), tails,
                             "; %d lines lost with Redis (allowed)"
                             % counts["lines lost with Redis"] if self.cluster else ""))

    def check_infos(self):
        """Exactly one INFO per departed user at each survivor logged in before it left."""
        journal, users = self.journal, self.clients.users
        checked, reaped = 0, []
        bound = self.args.node_lease + 2.0      # a dead node's users, by then
        for r in self.clients.live():
            for name, count in r.infos.items():
                u = users.get(name)
                if u is None or u.state != "gone":
                    journal.violation("info", "%s got INFO %s disconnected, but %s"
                                      % (r.name, name, "no such user" if u is None
                                         else "it is still connected"))
                elif u.refused:
                    journal.violation("info", "%s got INFO %s disconnected for a LOGIN that "
                                      "was refused" % (r.name, name))
            for u in users.values():
                if u.state == "gone" and u.ok_tick is not None and r.ok_tick < u.left_tick:
                    checked += 1
                    if not r.infos[u.name]:
                        journal.violation(
                            "info", "%s never got INFO %s disconnected (%s left at %.2f s, %s)"
                            % (r.name, u.name, u.name, u.left_at,
                               self.faults.kills_around(u.left_at)), u.killed_by)
                    elif u.killed_by is not None and u.killed_by.role == "node":
                        reaped.append(r.info_at[u.name] - u.killed_by.at)
        if reaped and max(reaped) > bound + SLACK:
            journal.violation("info", "a dead node's users were announced %.2f s after the "
                              "kill (the lease is %.1f s)" % (max(reaped), self.args.node_lease))
        journal.say("check: %d departures x survivors announced exactly once%s" % (
            checked, "; a dead node's users within %.2f s (lease + 2 s: %.1f s)"
            % (max(reaped), bound) if reaped else ""))

    def check_names(self):
        """Names held by survivors were never granted twice, nor left out of WHO."""
        journal, users = self.journal, self.clients.users
        for p in users.values():
            if p.probe_of is not None and p.ok_tick is not None and p.probe_of.state == "in":
                journal.violation("names", "LOGIN %s got OK at %.2f s while %s held the name "
                                  "(and still does)" % (p.name, p.ok_at, p.probe_of.name))
        for asker, at, missing in self.who_missing:
            # A cut user may be gone from the broker a moment before its EOF;
            # after Redis restarted empty, the nodes have a lease to register
            # their users again.
            if self.faults.near_redis_restart(at, 0.0, self.args.node_lease + 3.0):
                continue
            held = [n for n in missing if users[n].state == "in" or users[n].left_at
                    > at + (0.0 if users[n].killed_by else 1.0)]
            if held:
                journal.violation("who", "%s's WHO at %.2f s left out %s, logged in before it"
                                  % (asker, at, ", ".join(held)))
        c = journal.counts
        journal.say("check: %d WHO answers without duplicates; %d duplicate LOGINs, %d refused"
                    % (c["WHO answers checked"], c["duplicate LOGINs tried"],
                       c["duplicate LOGINs refused"]))

    def check_final_session(self):
        """Two new users: LOGIN, MSG, DM, WHO and PING all work after the chaos."""
        names = ("final-a", "final-b")
        try:
            a, b = [node.client(n) for node, n in zip((self.nodes[0], self.nodes[-1]), names)]
            try:
                a.send("MSG after the chaos")
                b.lines_until("MSG final-a after the chaos")
                b.send("DM final-a still here")
                a.lines_until("DM final-b still here")
                a.send("WHO", "PING")
                listed = a.lines_until("PONG")
                users = [line[5:] for line in listed if line.startswith("USER ")]
                want = sorted([u.name for u in self.clients.live()] + list(names))
                if sorted(users) != want:
                    self.journal.violation("final", "WHO after the chaos gave %s, not %s"
                                           % (users, want))
            finally:
                a.close()
                b.close()
        except (OSError, AssertionError) as exc:
            self.journal.violation("final", "a new session failed: %s" % exc)
            return
        self.journal.say("check: a new session works (LOGIN, MSG, DM, WHO, PING)")

    def check_processes(self):
        want = ["chat-broker", "chat-acceptor"] + ["chat-worker-%d" % k
                                                  for k in range(self.args.workers)]
        kills = self.faults.kills
        titles = [node.titles() for node in self.nodes]
        wrong = {"%s%s" % ("node%d " % n if self.cluster else "", t): len(titles[n].get(t, ()))
                 for n in range(len(self.nodes)) for t in want if len(titles[n].get(t, ())) != 1}
        if wrong:
            self.journal.violation("processes", "processes per role should be one each: %s"
                                   % wrong)
        alive = [k for k in kills if k.node is not None
                 and k.pid in [pid for pids in titles[k.node].values() for pid in pids]]
        if alive:
            self.journal.violation("processes", "killed but still there: %s"
                                   % ", ".join(map(str, alive)))
        replaced = [k.replaced_in for k in kills if k.replaced_in is not None]
        self.journal.say("check: one process per role (%s); %d kills, all replaced (slowest "
                         "%.2f s)" % (", ".join(want), len(kills), max(replaced, default=0.0))
                         if not wrong and len(replaced) == len(kills)
                         else "check: processes per role FAILED")

    def check_log(self):
        """Tracebacks are bugs; heartbeat kills are the supervisor's own."""
        lines = "\n".join(node.log() for node in self.nodes).splitlines()
        tracebacks = sum(1 for line in lines if line.startswith("Traceback"))
        if tracebacks:
            self.journal.violation("log", "the server logged %d tracebacks (see --server-log)"
                                   % tracebacks)
        for line in lines:
            if "missed its heartbeats" in line:
                self.journal.say("note: the supervisor killed a hung process: %s" % line)
