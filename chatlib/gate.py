"""The broker's accounts: who may take a registered name, and how a
password is checked without ever slowing the chat.

A :class:`Gate` stands between a ``LOGIN`` and the claim of its name. A
name nobody registered goes straight on (as it always did, without
accounts); a registered one (or any, on a ``--closed`` server) needs its
password checked. A check is scrypt (:mod:`chatlib.accounts`): tens of
milliseconds of a core, so it runs in a :class:`chatlib.hasher.Hasher`'s
low-priority threads, never on the loop, and only once it has passed the
throttle: no more checks under way per address and per name than failures
are allowed in a minute, none after that many failures (counted here, and
in cluster mode on every node: the directory's ``check_guess``), and a
bounded queue. ``REGISTER``, ``PASSWORD`` and the operator's ``account``
commands hash the same way.

The Gate owns the accounts: it saves them (``--state-dir``), tells the
broker when they change (for the supervisor, which hands them to a broker
that replaces this one) and sends each change to the other nodes.

It calls the broker back through four methods: ``answer(slot, cid, data)``,
``claim_name(slot, cid, name, peer)``, ``reply(request, lines, error)`` (an
operator's command) and ``accounts_changed(accounts)``.
"""

import os
import selectors
import time
from collections import Counter, deque
from functools import partial

from chatlib import accounts as accounting
from chatlib import protocol, statefile
from chatlib.control.users import utc

# Password checks at once (each takes a core for ~40 ms and 16 MiB), and
# waiting; past that a LOGIN with a password gets ERR too-many-attempts.
HASHERS = 2
HASH_QUEUE = 64
SEEN_SAVE_DELAY = 5.0   # seconds a last-login time may wait to be saved (not worth an fsync each)
REFUSED = object()      # a guess refused before its check (ERR too-many-attempts)
# ERR too-many-attempts comes this late: a guesser waits for its answer, so a
# crowd of them costs the chat a few answers a second, not tens of thousands
# (figures: docs/BENCHMARKS.md, "Accounts").
TARPIT = 1.0


class Gate:
    def __init__(self, config, accounts, log, broker):
        self.config = config
        self.accounts = accounts or accounting.Accounts()  # registered names
        self.log = log
        self.broker = broker
        self.sel = None                 # the broker's loop and directory, from start()
        self.directory = None
        self.throttle = accounting.Throttle()   # failed guesses per address, per name
        self.guessing = Counter()       # checks under way per address group, per name
        self.hasher = None              # chatlib.hasher.Hasher, from the first password on
        self.checking = {}              # (slot, cid) or ("ctl", request) -> (job, then)
        self.jobs = 0
        self.seen_save_due = None       # when the last-login times are saved
        self.tarpit = deque()           # (when, slot, cid): refusals still to answer

    # -- life ---------------------------------------------------------------------

    def start(self, sel, directory):
        self.sel = sel
        self.directory = directory

    def next_wakeup(self):
        return self.tarpit[0][0] if self.tarpit else None

    def tick(self, now):
        if self.seen_save_due is not None and now >= self.seen_save_due:
            self.save()
        while self.tarpit and self.tarpit[0][0] <= now:
            _, slot, cid = self.tarpit.popleft()
            self.broker.answer(slot, cid, protocol.ERR_TOO_MANY_ATTEMPTS)

    def refuse(self, slot, cid):
        """ERR too-many-attempts, TARPIT seconds from now. A connection that
        goes meanwhile is answered anyway: nobody hears it."""
        self.tarpit.append((time.monotonic() + TARPIT, slot, cid))

    def close(self):
        if self.seen_save_due is not None:
            self.save()
        if self.hasher is not None:
            self.hasher.close()

    def forget(self, slot, cid=None):
        """A connection (``cid`` None: every one of worker ``slot``) is gone:
        its check's result goes nowhere."""
        for owner in [owner for owner in self.checking
                      if owner[0] == slot and (cid is None or owner[1] == cid)]:
            del self.checking[owner]

    # -- LOGIN ------------------------------------------------------------------

    def log_in(self, slot, cid, name, peer, password):
        """A registered name (or any, on a closed server) needs its password
        checked first, off the loop (README: "Accounts"); without accounts,
        a password is a second word in a name, as ever."""
        key = name.lower()
        account = self.accounts.get(key)
        if account is None and not self.config.closed:
            if password is not None and not self.accounts:
                self.broker.answer(slot, cid, protocol.ERR_INVALID_USERNAME)
            else:
                self.broker.claim_name(slot, cid, name, peer)
        elif account is not None and self.config.accounts_tls_only and not peer[2]:
            self.broker.answer(slot, cid, protocol.ERR_TLS_REQUIRED)
        elif password is None:
            self.broker.answer(slot, cid, protocol.ERR_BAD_PASSWORD)
        else:
            stored = account.password if account is not None else accounting.decoy_hash()
            if not self.guess(slot, cid, peer[0], key, partial(
                    self.login_checked, slot, cid, name, peer, account is not None),
                    accounting.verify_password, password, stored):
                self.refuse(slot, cid)

    def login_checked(self, slot, cid, name, peer, registered, right):
        key = name.lower()
        if right is REFUSED:
            self.refuse(slot, cid)
        elif right is True and registered:
            self.throttle.succeeded(peer[0], key)
            self.broker.claim_name(slot, cid, name, peer)
        else:
            self.throttle.failed(peer[0], key, time.monotonic())
            self.directory.guess_failed(accounting.address_group(peer[0]), key)
            self.broker.answer(slot, cid, protocol.ERR_BAD_PASSWORD)

    def logged_in(self, key):
        """``key`` logged in: if registered, its last login, saved a little later."""
        if key in self.accounts:
            self.accounts.apply(("seen", key, time.time()))
            if self.seen_save_due is None:
                self.seen_save_due = time.monotonic() + SEEN_SAVE_DELAY

    # -- checks off the loop ------------------------------------------------------

    def guess(self, slot, cid, address, key, then, check, *args):
        """A password check, throttled before it costs anything. False if
        refused at once; ``then`` gets REFUSED if the cluster refuses it."""
        group = accounting.address_group(address)
        left_for_address, left_for_name = self.throttle.left(address, key, time.monotonic())
        if self.guessing[group] >= left_for_address or self.guessing[key] >= left_for_name:
            return False                # each check under way may be one more failure
        counted = (group, key)
        self.guessing.update(counted)
        self.directory.check_guess(group, key, partial(
            self.guess_allowed, (slot, cid), counted, then, check, args))
        return True

    def guess_allowed(self, owner, counted, then, check, args, allowed):
        if not (allowed and self.off_loop(owner, then, check, *args, counted=counted)):
            self.guessed(counted)
            then(REFUSED)

    def guessed(self, counted):
        """The guesses ``counted`` are not under way any more."""
        self.guessing.subtract(counted)
        for key in counted:
            if self.guessing[key] <= 0:
                del self.guessing[key]

    def off_loop(self, owner, then, func, *args, counted=()):
        """Run ``func(*args)`` (a password's hash) in a hasher thread; its
        result goes to ``then`` unless ``owner`` (a connection, or an
        operator's request) is gone by then. ``counted``: the guesses under
        way it is one of. False if too many wait."""
        if self.hasher is None:
            from chatlib.hasher import Hasher
            self.hasher = Hasher(max_in_flight=HASHERS, max_queued=HASH_QUEUE)
            self.sel.register(self.hasher.fileno(), selectors.EVENT_READ, self.on_hashed)
        self.jobs += 1
        if not self.hasher.submit((owner, self.jobs, counted), func, *args):
            return False
        self.checking[owner] = (self.jobs, then)
        return True

    def on_hashed(self, mask=None):
        for (owner, job, counted), result in self.hasher.results():
            self.guessed(counted)
            waiting = self.checking.get(owner)
            if waiting is not None and waiting[0] == job:
                del self.checking[owner]
                waiting[1](False if isinstance(result, Exception) else result)

    # -- REGISTER and PASSWORD ------------------------------------------------------

    def register(self, slot, cid, user, password, tls, change):
        """``REGISTER`` (or with ``change``, ``PASSWORD``) from the logged-in
        ``user`` (key, name; None if not logged in): checked here, hashed off
        the loop, then the name is theirs."""
        key = user[0] if user else None
        account = self.accounts.get(key)
        error = None
        if key is None:
            error = protocol.ERR_NOT_LOGGED_IN
        elif change and account is None:
            error = protocol.ERR_NOT_REGISTERED
        elif not change and (self.config.closed or self.config.no_register):
            error = protocol.ERR_REGISTRATION_CLOSED
        elif not change and account is not None:
            error = protocol.ERR_ALREADY_REGISTERED
        elif self.config.accounts_tls_only and not tls:
            error = protocol.ERR_TLS_REQUIRED
        else:
            try:
                accounting.check_new_password(password)
            except ValueError as exc:
                error = b"ERR %s\n" % str(exc).encode()
        if error is None:
            created = account.created if account is not None else time.time()
            if not self.off_loop((slot, cid), partial(self.registered, slot, cid, key, user[1],
                                                      created, change),
                                 accounting.hash_password, password):
                error = protocol.ERR_TOO_MANY_ATTEMPTS
        if error is not None:
            self.broker.answer(slot, cid, error)

    def registered(self, slot, cid, key, name, created, change, stored):
        if not stored:
            self.broker.answer(slot, cid, protocol.ERR_WEAK_PASSWORD)
            return
        self.change([("account", key, name, stored, created)])
        self.log.info("%s %s", name, "changed its password" if change else "registered its name")
        self.broker.answer(slot, cid, protocol.OK)

    # -- the operator's -------------------------------------------------------------

    def handle_account(self, request, rest):
        """``account add|password NAME PASSWORD`` (ctl read the password),
        ``account remove NAME``."""
        words = rest.split(None, 2)
        if len(words) < 2 or words[0] not in ("add", "password", "remove") \
                or not protocol.valid_name(words[1].encode()):
            raise ValueError("usage: account add|password|remove NAME")
        action, name = words[0], words[1]
        key = name.lower()
        account = self.accounts.get(key)
        if action == "add" and account is not None:
            self.broker.reply(request, [], "already-registered")
        elif action != "add" and account is None:
            self.broker.reply(request, [], "not-registered")
        elif action == "remove":
            self.change([("unregister", key)])
            self.log.info("operator: removed the account %s", account.name)
            self.broker.reply(request)
        else:
            password = words[2] if len(words) > 2 else ""
            try:
                accounting.check_new_password(password)
            except ValueError as exc:
                self.broker.reply(request, [], str(exc))
                return
            name, created = (name, time.time()) if account is None else \
                (account.name, account.created)
            if not self.off_loop(("ctl", request), partial(self.operator_hashed, request, key,
                                                           name, created, action),
                                 accounting.hash_password, password):
                self.broker.reply(request, [], "busy too many password checks under way")

    def operator_hashed(self, request, key, name, created, action, stored):
        if not stored:
            self.broker.reply(request, [], "weak-password")
            return
        self.change([("account", key, name, stored, created)])
        self.log.info("operator: %s %s", "registered" if action == "add" else
                      "set the password of", name)
        self.broker.reply(request)

    def handle_accounts(self, request, rest):
        self.broker.reply(request, ["%s created=%s last-login=%s" % (
            account.name, utc(account.created), utc(account.last_login))
            for account in self.accounts.listing()])

    # -- keeping them -------------------------------------------------------------------

    def change(self, ops, publish=True):
        """Apply changes of the accounts: saved, handed to the broker and
        (``publish``) sent to the other nodes. True if anything changed."""
        changed = [op for op in ops if self.accounts.apply(op)]
        if changed:
            self.changed()
            if publish:
                self.directory.control([("account", op) for op in changed])
        return bool(changed)

    def remote(self, op):
        """A change made on another node."""
        if self.change([op], publish=False) and op[0] != "seen":
            self.log.info("accounts, on another node: %s %s", *op[:2])

    def restore(self, ops, kept):
        """Joined: the accounts Redis holds, or, when Redis had lost them
        (``kept``), ours, to give back (returned)."""
        if kept:
            return self.accounts.ops()
        fresh = accounting.Accounts(ops)
        if fresh.ops() != self.accounts.ops():
            self.accounts = fresh
            self.changed()
        return None

    def changed(self):
        self.save()
        self.broker.accounts_changed(self.accounts)

    def save(self):
        self.seen_save_due = None
        path = os.path.join(self.config.state_dir, accounting.ACCOUNTS_FILE)
        try:
            statefile.save_json(path, self.accounts.to_json())
        except OSError as exc:
            self.log.error("cannot save the accounts in %s (changes hold until a restart): %s",
                           path, exc.strerror or exc)
