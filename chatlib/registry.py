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
    P:lease:<id>   string that token, expiring: the node is alive while it exists
    P:held:<id>    set    the names node <id> holds (what a reaper frees)
    P:cursor:<id>  string the bus entry up to which node <id> surely routed:
                          where a restarted broker of the same run resumes
    P:epoch        string a random value set when the registry is created: a
                          node that finds another one knows Redis lost its data
    P:recovering   string exists for one lease after such a loss: no new names
                          until every live node has registered its users again
    P:bus          stream what nodes tell each other, one entry per broker turn

A bus entry has the fields ``o`` (origin node, or ``reaper``), ``d`` (the
records of :mod:`chatlib.bus`: MSG lines and DMs), ``l`` (display names of
departed users, newline-separated: an ``INFO`` each), ``q`` (names released
without an announcement) and ``j`` (names just claimed: for directories).

The scripts build key names from the prefix (``ARGV[1]``) instead of
declaring them in ``KEYS``: fine on a standalone Redis or Valkey, which is
what cluster mode supports; a Redis Cluster would need every key declared
and one hash slot (the step after one Redis: see docs/ARCHITECTURE.md).
"""

from chatlib.redis_client import Script

STREAM_MAXLEN = 20000   # entries kept in P:bus (trimmed with MAXLEN ~)

_PRELUDE = r"""
local P = ARGV[1]
local USERS, NAMES, ORDER = P .. ':users', P .. ':names', P .. ':order'
local NODES, BUS = P .. ':nodes', P .. ':bus'
local function held(node) return P .. ':held:' .. node end
local function lease(node) return P .. ':lease:' .. node end
local function cursor(node) return P .. ':cursor:' .. node end
local function node_of(owner) return string.match(owner, '^%S+') end

-- Free `key` if `owner` holds it; the name as typed, or nil.
local function release(key, owner)
  if not owner or redis.call('HGET', USERS, key) ~= owner then return nil end
  local name = redis.call('HGET', NAMES, key)
  redis.call('HDEL', USERS, key)
  redis.call('HDEL', NAMES, key)
  redis.call('ZREM', ORDER, name)
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

# ARGV: P node token lease_ms maxlen new_epoch known_epoch mode, then for
# mode 'restore' the node's users as (key owner name stamp) quadruples.
# Returns {'duplicate', ms left} | {'epoch', epoch} (call again to restore)
# | {'ok', epoch, bus id to read after, every key in P:users, keys held
# by others}. The bus id is the last entry for a new run of the node, and
# the saved cursor for a restarted broker of the same run.
JOIN = Script(_PRELUDE + r"""
local node, token, lease_ms, maxlen = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local known, mode = ARGV[7], ARGV[8]
local current = redis.call('GET', lease(node))
if current and current ~= token then
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
if known ~= '' and known ~= epoch and mode ~= 'restore' then
  return {'epoch', epoch}
end
local previous = redis.call('HGET', NODES, node)
if previous and previous ~= token then
  announce_reaped(maxlen, reap(node))      -- an earlier run, its lease run out
end
local conflicts, joined = {}, {}
if mode == 'restore' then
  local top = tonumber(redis.call('GET', P .. ':stamp') or '0')
  for i = 9, #ARGV, 4 do
    local key, owner, name, stamp = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
    local holder = redis.call('HGET', USERS, key)
    if not holder then
      redis.call('HSET', USERS, key, owner)
      redis.call('HSET', NAMES, key, name)
      redis.call('ZADD', ORDER, stamp, name)
      redis.call('SADD', held(node), key)
      joined[#joined + 1] = key
      if stamp > top then top = stamp end
    elseif holder ~= owner then
      conflicts[#conflicts + 1] = key
    end
  end
  redis.call('SET', P .. ':stamp', top)
  if #joined > 0 then
    publish(maxlen, {'o', node, 'j', table.concat(joined, '\n')})
  end
end
redis.call('SET', lease(node), token, 'PX', lease_ms)
redis.call('HSET', NODES, node, token)
local start = current and redis.call('GET', cursor(node))
if not start then
  local last = redis.call('XREVRANGE', BUS, '+', '-', 'COUNT', 1)
  start = '0-0'
  if #last > 0 then start = last[1][1] end
  redis.call('SET', cursor(node), start, 'PX', lease_ms * 3)
end
return {'ok', epoch, start, redis.call('HKEYS', USERS), conflicts}
""")

# ARGV: P node token lease_ms epoch maxlen retention_ms cursor.
# Renews this node's lease (and saves its cursor, if not ''), reaps the
# nodes whose lease ran out, trims the bus to what a node resuming after a
# short outage may still need.
# Returns {'ok', {node, users reaped, ...}} | {'epoch'} | {'reaped'}.
HEARTBEAT = Script(_PRELUDE + r"""
local node, token, lease_ms, maxlen = ARGV[2], ARGV[3], ARGV[4], ARGV[6]
if redis.call('GET', P .. ':epoch') ~= ARGV[5] then return {'epoch'} end
if redis.call('HGET', NODES, node) ~= token then return {'reaped'} end
redis.call('SET', lease(node), token, 'PX', lease_ms)
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
return {'ok', reaped}
""")

# ARGV: P node token key name owner. Returns the login stamp, 0 if the name
# is taken, -1 if no name may be given now (recovering, or not registered).
CLAIM = Script(_PRELUDE + r"""
local node, token, key, name, owner = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
if redis.call('HGET', NODES, node) ~= token then return -1 end
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
return stamp
""")

# ARGV: P node token maxlen data count, then count (key owner announce)
# triples to release, then (key owner) pairs just claimed. One bus entry
# with the turn's records, the departures it really freed (an INFO each,
# or quietly) and the claims still held. Returns 'ok' or 'reaped'.
PUBLISH = Script(_PRELUDE + r"""
local node, token, maxlen = ARGV[2], ARGV[3], ARGV[4]
if redis.call('HGET', NODES, node) ~= token then return 'reaped' end
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

# ARGV: P node token maxlen key data. A DM to a name this node's directory
# did not know: sent if the name is logged in anywhere. Returns 1 if sent,
# 0 if nobody has the name, -1 if this node is not registered.
DM = Script(_PRELUDE + r"""
if redis.call('HGET', NODES, ARGV[2]) ~= ARGV[3] then return -1 end
if redis.call('HEXISTS', USERS, ARGV[5]) == 0 then return 0 end
publish(ARGV[4], {'o', ARGV[2], 'd', ARGV[6]})
return 1
""")

# ARGV: P node token maxlen. A node shutting down: its users are announced
# gone and its names freed at once, instead of after its lease.
LEAVE = Script(_PRELUDE + r"""
if redis.call('HGET', NODES, ARGV[2]) ~= ARGV[3] then return 0 end
local names = reap(ARGV[2])
announce_reaped(ARGV[4], names)
return #names
""")

SCRIPTS = (JOIN, HEARTBEAT, CLAIM, PUBLISH, DM, LEAVE)


def who_command(prefix):
    """``WHO``: every name, as typed, in login order."""
    return ("ZRANGE", prefix + ":order", 0, -1)


def read_command(prefix, cursor, count, block_ms):
    """The next bus entries after ``cursor``, waiting up to ``block_ms``."""
    return ("XREAD", "COUNT", count, "BLOCK", block_ms, "STREAMS", prefix + ":bus", cursor)
