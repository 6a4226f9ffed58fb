"""The cluster's state in Redis: its keys, and the Lua scripts that change it.

Every change that must be atomic runs as one script: claiming a name with
its place in login order, releasing names together with the stream entry
that announces them, reaping a dead node. Redis runs a script alone, so of
thirty nodes racing for a name exactly one wins, and a release and its
``INFO`` entry are seen together or not at all.

Keys, all under the cluster's prefix ``P`` (``--cluster``, default ``chat``):

    P:users        hash   name (lower case) -> owner "node slot cid"
    P:names        hash   name (lower case) -> name as typed
    P:order        zset   name as typed, scored by its login stamp (WHO)
    P:stamp        string the last login stamp given
    P:nodes        hash   node id -> token of the run that registered it
    P:lease:<id>   string the node's lease, expiring: the node is alive while it
                          exists. Its value, ``<run token>.<random>``, is new at
                          every JOIN: the fencing token (see below)
    P:held:<id>    set    the names node <id> holds (what a reaper frees)
    P:cursor:<id>  string the bus entry up to which node <id> surely routed:
                          where a restarted broker of the same run resumes
    P:epoch        string a random value set when the registry is created: a
                          node that finds another one knows Redis lost its data
    P:recovering   string exists for one lease after such a loss: no new names
                          until every live node has registered its users again
    P:info         hash   name (lower case) -> "address port tls since" of the
                          connection, for the operator's ``users``
    P:moderation   hash   "ban <target>" or "mute <name>" -> the change that made it
                          (:func:`chatlib.moderation.encode_op`): the chat's bans
                          and mutes, which every node also keeps on disk
    P:accounts     hash   name (lower case) -> the change that made the account
                          (:func:`chatlib.accounts.encode_op`), kept on disk too
    P:failed:a:<g> string wrong passwords from address group <g>, and
    P:failed:n:<k> string at name <k>, in a window that expires (the throttle)
    P:bus          stream what nodes tell each other, one entry per broker turn

A bus entry has the fields ``o`` (origin node, or ``reaper``), ``d`` (the
records of :mod:`chatlib.cluster.bus`: MSG lines and DMs), ``l`` (display names of
departed users, newline-separated: an ``INFO`` each), ``q`` (names released
without an announcement), ``j`` (names just claimed: for directories) and
``c`` (the operator's commands for every node: :func:`chatlib.cluster.bus.encode_control`).

Every script but JOIN takes ``P node lease`` as its first three arguments,
``lease`` being the value the node's last JOIN gave its lease key, and does
nothing unless that key still holds it. So a node that was frozen, paused or
cut off past its lease (whose users the others may have announced gone and
whose names they may have given out again) cannot change anything, however
late its commands arrive: it must JOIN again, and is told its lease lapsed.

The scripts build key names from the prefix (``ARGV[1]``) instead of
declaring them in ``KEYS``: fine on a standalone Redis or Valkey, which is
what cluster mode supports; a Redis Cluster would need every key declared
and one hash slot (the step after one Redis: see docs/ARCHITECTURE.md).
"""

from chatlib.cluster.redis_client import Script

STREAM_MAXLEN = 20000   # entries kept in P:bus (trimmed with MAXLEN ~)

_PRELUDE = r"""
local P = ARGV[1]
local USERS, NAMES, ORDER = P .. ':users', P .. ':names', P .. ':order'
local NODES, BUS = P .. ':nodes', P .. ':bus'
local function held(node) return P .. ':held:' .. node end
local function lease(node) return P .. ':lease:' .. node end
local function cursor(node) return P .. ':cursor:' .. node end
local function node_of(owner) return string.match(owner, '^%S+') end
local function run_of(lease_value) return string.match(lease_value, '^[^.]*') end
-- The fencing token: does `node` still hold the lease `value`?
local function holds(node, value) return redis.call('GET', lease(node)) == value end

-- Free `key` if `owner` holds it; the name as typed, or nil.
local function release(key, owner)
  if not owner or redis.call('HGET', USERS, key) ~= owner then return nil end
  local name = redis.call('HGET', NAMES, key)
  redis.call('HDEL', USERS, key)
  redis.call('HDEL', NAMES, key)
  redis.call('ZREM', ORDER, name)
  redis.call('HDEL', P .. ':info', key)
  redis.call('SREM', held(node_of(owner)), key)
  return name
end

-- Forget `node` and free every name it held; their names as typed.
local function reap(node)
  local names = {}
  for _, key in ipairs(redis.call('SMEMBERS', held(node))) do
    local owner = redis.call('HGET', USERS, key)
    if owner and node_of(owner) == node then
      names[#names + 1] = release(key, owner)
    end
  end
  redis.call('DEL', held(node), lease(node), cursor(node))
  redis.call('HDEL', NODES, node)
  return names
end

-- One bus entry; `fields` starts with the origin ('o', id).
local function publish(maxlen, fields)
  if #fields > 2 then
    redis.call('XADD', BUS, 'MAXLEN', '~', maxlen, '*', unpack(fields))
  end
end

local function announce_reaped(maxlen, names)
  if #names > 0 then
    publish(maxlen, {'o', 'reaper', 'l', table.concat(names, '\n')})
  end
end
"""

# ARGV: P node lease lease_ms maxlen new_epoch known_epoch mode first, then
# the node's users as (key owner name stamp) quadruples. ``lease`` is the new
# value of the node's lease (``<run token>.<random>``); ``mode`` is '', or
# 'lost' when the node finds Redis is not the server it wrote to (restarted,
# or failed over to a replica that may have missed writes), or 'restore' to
# register its users again after that. ``first``: '1' from a broker's first
# JOIN, whose users are all the node has (a restarted broker's, from its
# workers): names the node holds beyond them are released and announced.
#
# The users are checked against the registry, atomically: while the node's
# lease has run on without a break (it is renewed here) each must be held by
# its owner or is claimed again if free (restore); a name held by another is
# a conflict. A node whose lease lapsed (its run's lease key is gone) is
# reaped first, its users announced gone, and none of the users given is
# registered: they are all returned as conflicts, for the node to close.
#
# Returns {'duplicate', ms left} | {'epoch', epoch} (call again to restore)
# | {'ok', epoch, bus id to read after, every key in P:users, conflicts,
# 1 if the lease had lapsed, the values of P:moderation, of P:accounts}. The bus id is the last entry for a new run of
# the node, and the saved cursor when its lease ran on.
JOIN = Script(_PRELUDE + r"""
local node, value, lease_ms, maxlen = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local known, mode, first = ARGV[7], ARGV[8], ARGV[9]
local run = run_of(value)
local current = redis.call('GET', lease(node))
if current and run_of(current) ~= run then
  return {'duplicate', redis.call('PTTL', lease(node))}
end
local epoch = redis.call('GET', P .. ':epoch')
if not epoch then
  epoch = ARGV[6]
  redis.call('SET', P .. ':epoch', epoch)
  if known ~= '' then
    redis.call('SET', P .. ':recovering', '1', 'PX', lease_ms)
  end
end
if mode == 'lost' then
  redis.call('SET', P .. ':recovering', '1', 'PX', lease_ms)
  return {'epoch', epoch}
end
if known ~= '' and known ~= epoch and mode ~= 'restore' then
  return {'epoch', epoch}
end
local lapsed = not current and mode ~= 'restore'
if redis.call('HEXISTS', NODES, node) == 1 and (lapsed or redis.call('HGET', NODES, node) ~= run) then
  announce_reaped(maxlen, reap(node))      -- its lease ran out: a lapse, or an earlier run
end
local conflicts, joined, given = {}, {}, {}
local top = tonumber(redis.call('GET', P .. ':stamp') or '0')
for i = 10, #ARGV, 4 do
  local key, owner, name, stamp = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
  local holder = redis.call('HGET', USERS, key)
  given[key] = true
  if lapsed or (holder and holder ~= owner) then
    conflicts[#conflicts + 1] = key
  elseif not holder then
    redis.call('HSET', USERS, key, owner)
    redis.call('HSET', NAMES, key, name)
    redis.call('ZADD', ORDER, stamp, name)
    redis.call('SADD', held(node), key)
    joined[#joined + 1] = key
    if stamp > top then top = stamp end
  end
end
redis.call('SET', P .. ':stamp', top)
if #joined > 0 then
  publish(maxlen, {'o', node, 'j', table.concat(joined, '\n')})
end
if first == '1' and not lapsed then
  local gone = {}
  for _, key in ipairs(redis.call('SMEMBERS', held(node))) do
    if not given[key] then gone[#gone + 1] = release(key, redis.call('HGET', USERS, key)) end
  end
  if #gone > 0 then publish(maxlen, {'o', node, 'l', table.concat(gone, '\n')}) end
end
redis.call('SET', lease(node), value, 'PX', lease_ms)
redis.call('HSET', NODES, node, run)
local start = current and redis.call('GET', cursor(node))
if not start then
  local last = redis.call('XREVRANGE', BUS, '+', '-', 'COUNT', 1)
  start = '0-0'
  if #last > 0 then start = last[1][1] end
  redis.call('SET', cursor(node), start, 'PX', lease_ms * 3)
end
return {'ok', epoch, start, redis.call('HKEYS', USERS), conflicts, lapsed and 1 or 0,
        redis.call('HVALS', P .. ':moderation'), redis.call('HVALS', P .. ':accounts')}
""")

# ARGV: P node lease lease_ms epoch maxlen retention_ms cursor.
# Renews this node's lease (and saves its cursor, if not ''), reaps the
# nodes whose lease ran out, trims the bus to what a node resuming after a
# short outage may still need.
# Returns {'ok', {node, users reaped, ...}, live nodes} | {'epoch'} |
# {'lapsed'} (the lease ran out, or the node was reaped: it must JOIN again).
HEARTBEAT = Script(_PRELUDE + r"""
local node, value, lease_ms, maxlen = ARGV[2], ARGV[3], ARGV[4], ARGV[6]
if redis.call('GET', P .. ':epoch') ~= ARGV[5] then return {'epoch'} end
if not holds(node, value) then return {'lapsed'} end
redis.call('SET', lease(node), value, 'PX', lease_ms)
if ARGV[8] ~= '' then redis.call('SET', cursor(node), ARGV[8], 'PX', lease_ms * 3) end
local reaped = {}
for _, other in ipairs(redis.call('HKEYS', NODES)) do
  if redis.call('EXISTS', lease(other)) == 0 then
    local names = reap(other)
    announce_reaped(maxlen, names)
    reaped[#reaped + 1] = other
    reaped[#reaped + 1] = #names
  end
end
local now = redis.call('TIME')
local oldest = tonumber(now[1]) * 1000 - tonumber(ARGV[7])
redis.call('XTRIM', BUS, 'MINID', '~', oldest)
return {'ok', reaped, redis.call('HLEN', NODES)}
""")

# ARGV: P node lease key name owner info (for P:info). Returns the login
# stamp, 0 if the name is taken, -1 if no name may be given now
# (recovering, or the lease lapsed).
CLAIM = Script(_PRELUDE + r"""
local node, key, name, owner = ARGV[2], ARGV[4], ARGV[5], ARGV[6]
if not holds(node, ARGV[3]) then return -1 end
local holder = redis.call('HGET', USERS, key)
if holder == owner then                        -- our own claim, sent again
  return tonumber(redis.call('ZSCORE', ORDER, redis.call('HGET', NAMES, key)))
end
if holder then return 0 end
if redis.call('EXISTS', P .. ':recovering') == 1 then return -1 end
local stamp = redis.call('INCR', P .. ':stamp')
redis.call('HSET', USERS, key, owner)
redis.call('HSET', NAMES, key, name)
redis.call('ZADD', ORDER, stamp, name)
redis.call('SADD', held(node), key)
redis.call('HSET', P .. ':info', key, ARGV[7])
return stamp
""")

# ARGV: P node lease maxlen data count, then count (key owner announce)
# triples to release, then (key owner) pairs just claimed. One bus entry
# with the turn's records, the departures it really freed (an INFO each,
# or quietly) and the claims still held. Returns 'ok' or 'lapsed'.
PUBLISH = Script(_PRELUDE + r"""
local node, maxlen = ARGV[2], ARGV[4]
if not holds(node, ARGV[3]) then return 'lapsed' end
local left, quiet, joined = {}, {}, {}
local i = 7
for _ = 1, tonumber(ARGV[6]) do
  local name = release(ARGV[i], ARGV[i + 1])
  if name and ARGV[i + 2] == '1' then
    left[#left + 1] = name
  elseif name then
    quiet[#quiet + 1] = ARGV[i]
  end
  i = i + 3
end
while i <= #ARGV do
  if redis.call('HGET', USERS, ARGV[i]) == ARGV[i + 1] then joined[#joined + 1] = ARGV[i] end
  i = i + 2
end
local fields = {'o', node}
if ARGV[5] ~= '' then fields[#fields + 1] = 'd'; fields[#fields + 1] = ARGV[5] end
if #left > 0 then fields[#fields + 1] = 'l'; fields[#fields + 1] = table.concat(left, '\n') end
if #quiet > 0 then fields[#fields + 1] = 'q'; fields[#fields + 1] = table.concat(quiet, '\n') end
if #joined > 0 then fields[#fields + 1] = 'j'; fields[#fields + 1] = table.concat(joined, '\n') end
publish(maxlen, fields)
return 'ok'
""")

# ARGV: P node lease maxlen key data. A DM to a name this node's directory
# did not know: sent if the name is logged in anywhere. Returns 1 if sent,
# 0 if nobody has the name, -1 if the node's lease lapsed.
DM = Script(_PRELUDE + r"""
if not holds(ARGV[2], ARGV[3]) then return -1 end
if redis.call('HEXISTS', USERS, ARGV[5]) == 0 then return 0 end
publish(ARGV[4], {'o', ARGV[2], 'd', ARGV[6]})
return 1
""")

# ARGV: P node lease maxlen. A node shutting down: its users are announced
# gone and its names freed at once, instead of after its lease.
LEAVE = Script(_PRELUDE + r"""
if not holds(ARGV[2], ARGV[3]) then return 0 end
local names = reap(ARGV[2])
announce_reaped(ARGV[4], names)
return #names
""")

# ARGV: P node lease maxlen records, then (hash field value) triples, the
# hash 'moderation' or 'accounts' (P:moderation, P:accounts), an empty value
# deleting the field. The operator's commands for every node: the bans,
# mutes and accounts changed, and one bus entry (field ``c``) with the
# records. Returns 'ok' or 'lapsed'.
CONTROL = Script(_PRELUDE + r"""
if not holds(ARGV[2], ARGV[3]) then return 'lapsed' end
for i = 6, #ARGV, 3 do
  local hash = P .. ':' .. ARGV[i]
  if ARGV[i + 2] == '' then
    redis.call('HDEL', hash, ARGV[i + 1])
  else
    redis.call('HSET', hash, ARGV[i + 1], ARGV[i + 2])
  end
end
if ARGV[5] ~= '' then publish(ARGV[4], {'o', ARGV[2], 'c', ARGV[5]}) end
return 'ok'
""")

# ARGV: P. Every user in login order, for the operator's ``users``: a flat
# list of (name as typed, stamp, owner, info) quadruples.
USERS = Script(_PRELUDE + r"""
local rows = {}
local order = redis.call('ZRANGE', ORDER, 0, -1, 'WITHSCORES')
for i = 1, #order, 2 do
  local key = string.lower(order[i])
  rows[#rows + 1] = order[i]
  rows[#rows + 1] = order[i + 1]
  rows[#rows + 1] = redis.call('HGET', USERS, key) or ''
  rows[#rows + 1] = redis.call('HGET', P .. ':info', key) or ''
end
return rows
""")

# ARGV: P node lease group key max. May a password be checked for a guess
# from the address group `group` at the name `key`? 1 unless either has
# failed `max` times in the current window (FAILED), on any node.
GUESSES = Script(_PRELUDE + r"""
if not holds(ARGV[2], ARGV[3]) then return 0 end
local max = tonumber(ARGV[6])
if tonumber(redis.call('GET', P .. ':failed:a:' .. ARGV[4]) or '0') >= max then return 0 end
if tonumber(redis.call('GET', P .. ':failed:n:' .. ARGV[5]) or '0') >= max then return 0 end
return 1
""")

# ARGV: P node lease group key window_ms. A wrong password: counted for the
# address group and the name, in a window that starts with the first.
FAILED = Script(_PRELUDE + r"""
if not holds(ARGV[2], ARGV[3]) then return 'lapsed' end
for _, counter in ipairs({P .. ':failed:a:' .. ARGV[4], P .. ':failed:n:' .. ARGV[5]}) do
  if redis.call('INCR', counter) == 1 then redis.call('PEXPIRE', counter, ARGV[6]) end
end
return 'ok'
""")

SCRIPTS = (JOIN, HEARTBEAT, CLAIM, PUBLISH, DM, LEAVE, CONTROL, USERS, GUESSES, FAILED)


def who_command(prefix):
    """``WHO``: every name, as typed, in login order."""
    return ("ZRANGE", prefix + ":order", 0, -1)


def read_command(prefix, cursor, count, block_ms):
    """The next bus entries after ``cursor``, waiting up to ``block_ms``."""
    return ("XREAD", "COUNT", count, "BLOCK", block_ms, "STREAMS", prefix + ":bus", cursor)
