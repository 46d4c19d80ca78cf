-- The shared prelude of every rate-limit script: constants and the bucket and counter maths.
--
-- This is the Redis twin of ratelimit/bucket.py (the buckets) and ratelimit/quota.py (the
-- quota); read those modules' docstrings for the rules and the integer scheme. Every function
-- here mirrors the Python function of the same name, and a property test runs both on the same
-- inputs and requires identical replies and identical stored state.
--
-- A script is sent as clock.lua (the `now_ms` function) + this prelude + one operation's body
-- (acquire.lua, acquire_quota.lua, adjust.lua, record.lua, seed.lua). Each body documents its own
-- KEYS and ARGV; an argument always means the same thing for a given script.
--
-- Buckets are hashes (l = level in units, t = updated at, in ms); usage counters are integer
-- strings. All keys of one call share the hash tag {ws:<id>}, so they live in one slot.
--
-- Lua 5.1 numbers are doubles: every value stays an integer below 2^53, so all arithmetic here
-- is exact, and numbers are written back with %d because tostring would keep only 14 digits.

local UNITS_PER_TOKEN = 60000
local TTL_MARGIN_MS = 1000
local KEEP_MS = 3456000000 -- bucket.py's KEEP_MS (40 days): a workspace's keys expire together
local MAX_COUNTER = 1000000000000000 -- 10^15
local MAX_CHARGE = 10000000000 -- 10^10 tokens: the most one report charges (bucket.MAX_CHARGE)
local MAX_DEBT = 100000000000 -- 10^11 tokens: the deepest a bucket's debt goes (bucket.MAX_DEBT)

-- Integer floor division. For operands below 2^53, floor(a / b) on doubles is already exact; the
-- correction (whose products are exact too) is defence in depth, so this never rests on how the
-- division happened to round.
local function floor_div(a, b)
  local q = math.floor(a / b)
  if q * b > a then
    q = q - 1
  elseif (q + 1) * b <= a then
    q = q + 1
  end
  return q
end

local function ceil_div(a, b)
  return floor_div(a + b - 1, b)
end

local function capacity(limit)
  return limit * UNITS_PER_TOKEN
end

local function ms_to_reach(limit, level, target)
  if level >= target then
    return 0
  end
  return ceil_div(target - level, limit)
end

-- Returns level, updated_ms: the bucket refilled up to now (a missing key is a full bucket).
local function level_at(key, limit, now)
  local cap = capacity(limit)
  local stored = redis.call('HMGET', key, 'l', 't')
  local level, updated = tonumber(stored[1]), tonumber(stored[2])
  if level == nil or updated == nil then
    return cap, now
  end
  if level > cap then
    level = cap
  end
  if now <= updated then
    return level, updated
  end
  local elapsed = math.min(now - updated, ms_to_reach(limit, level, cap))
  return math.min(cap, level + elapsed * limit), now
end

local function store(key, limit, level, updated)
  redis.call('HSET', key, 'l', string.format('%d', level), 't', string.format('%d', updated))
  local ttl = math.max(ms_to_reach(limit, level, capacity(limit)) + TTL_MARGIN_MS, KEEP_MS)
  redis.call('PEXPIRE', key, string.format('%d', ttl))
end

local function remaining(level)
  if level > 0 then
    return floor_div(level, UNITS_PER_TOKEN)
  end
  return 0
end

local function reset_ms(limit, level)
  return ms_to_reach(limit, level, capacity(limit))
end

-- Charge or refund the token bucket (the caller checks tpm > 0); returns the new level.
-- Overuse is carried whole as debt, down to MAX_DEBT (a bound for exactness, not policy).
local function adjust(key, tpm, delta, now)
  local cap = capacity(tpm)
  local level, updated = level_at(key, tpm, now)
  delta = math.max(-MAX_CHARGE, math.min(delta, MAX_CHARGE))
  level = math.max(-MAX_DEBT * UNITS_PER_TOKEN, math.min(cap, level - delta * UNITS_PER_TOKEN))
  store(key, tpm, level, updated)
  return level
end

-- Both buckets refilled up to now; a bucket whose limit is 0 (unlimited) is not read.
local function read_buckets(req_key, tok_key, rpm, tpm, now)
  local b = {req_key = req_key, tok_key = tok_key, rpm = rpm, tpm = tpm}
  if rpm > 0 then
    b.req_level, b.req_updated = level_at(req_key, rpm, now)
  end
  if tpm > 0 then
    b.tok_level, b.tok_updated = level_at(tok_key, tpm, now)
  end
  return b
end

-- {allowed, denied_by (0 none, 1 requests, 2 tokens), too_large, retry_ms,
--  req_remaining, req_reset_ms, tok_remaining, tok_reset_ms}
local function bucket_reply(b, allowed, denied_by, too_large, retry_ms)
  local r = {allowed, denied_by, too_large, retry_ms, 0, 0, 0, 0}
  if b.rpm > 0 then
    r[5] = remaining(b.req_level)
    r[6] = reset_ms(b.rpm, b.req_level)
  end
  if b.tpm > 0 then
    r[7] = remaining(b.tok_level)
    r[8] = reset_ms(b.tpm, b.tok_level)
  end
  return r
end

-- Take one request and `cost` tokens if both fit (all or nothing); returns the bucket reply.
local function take(b, cost)
  if b.tpm > 0 and cost > b.tpm then
    return bucket_reply(b, 0, 2, 1, 0)
  end
  local req_need = UNITS_PER_TOKEN
  local tok_need = cost * UNITS_PER_TOKEN
  local req_wait, tok_wait = 0, 0
  if b.rpm > 0 then
    req_wait = ms_to_reach(b.rpm, b.req_level, req_need)
  end
  if b.tpm > 0 then
    tok_wait = ms_to_reach(b.tpm, b.tok_level, tok_need)
  end
  if req_wait > 0 or tok_wait > 0 then
    local denied_by = 2
    if req_wait > 0 then
      denied_by = 1
    end
    return bucket_reply(b, 0, denied_by, 0, math.max(req_wait, tok_wait))
  end
  if b.rpm > 0 then
    b.req_level = b.req_level - req_need
    store(b.req_key, b.rpm, b.req_level, b.req_updated)
  end
  if b.tpm > 0 then
    b.tok_level = b.tok_level - tok_need
    store(b.tok_key, b.tpm, b.tok_level, b.tok_updated)
  end
  return bucket_reply(b, 1, 0, 0, 0)
end

-- A usage counter, or nil when it does not exist. Values beyond MAX_COUNTER (never written by
-- these scripts) read as MAX_COUNTER, so the sums below stay exact.
local function read_counter(key)
  local stored = redis.call('GET', key)
  if not stored then
    return nil
  end
  local value = tonumber(stored)
  if value == nil then
    error('usage counter ' .. key .. ' is not a number')
  end
  return math.min(value, MAX_COUNTER)
end

local function record(key, amount, ttl)
  local value = redis.call('INCRBY', key, string.format('%d', amount))
  if value > MAX_COUNTER then
    value = MAX_COUNTER
    redis.call('SET', key, string.format('%d', value))
  end
  redis.call('EXPIRE', key, ttl)
  return value
end

-- Which usage counters exist, as the replies carry it: 1 tokens + 2 spend (3 = both, "known").
local function existed_mask(tokens_exist, spend_exists)
  local mask = 0
  if tokens_exist then
    mask = mask + 1
  end
  if spend_exists then
    mask = mask + 2
  end
  return mask
end

local function seed(key, amount, ttl)
  local set = redis.call('SET', key, string.format('%d', math.min(amount, MAX_COUNTER)), 'NX',
    'EX', ttl)
  if set then
    return 1
  end
  return 0
end

-- Operation replies (adjust, record) live in one hash per workspace, a field per operation id:
-- "<forget at, ms>,<reply...>", and a field past its time reads as absent. One hash, not a key
-- per operation: a slot migrating away creates no new keys (ratelimit/redis_cluster.py), and
-- the hash lives as long as the workspace's other keys. Forgotten fields are deleted in passes:
-- one starts once the hash has doubled since the last one ended, and scans PRUNE_PER_CALL fields
-- per call until it is done, so a call's share of the work is bounded, and small on average.
local PRUNE_PER_CALL = 64
local PRUNE_FROM = 64
local PRUNE_STATE = '' -- a field no operation id can be: "<HSCAN cursor>,<size to start at>"

-- The stored reply of operation `id` if it already ran (this call is a retry of it), or nil.
local function recall(key, id, now)
  local stored = redis.call('HGET', key, id)
  if not stored then
    return nil
  end
  local reply = {}
  for value in string.gmatch(stored, '[^,]+') do
    reply[#reply + 1] = tonumber(value)
  end
  if table.remove(reply, 1) <= now then
    return nil
  end
  return reply
end

-- Delete forgotten operations: the next step of a pass, or none while the hash is small.
local function prune(key, now)
  local state = redis.call('HGET', key, PRUNE_STATE) or ('0,' .. PRUNE_FROM)
  local cursor, start_at = string.match(state, '^([^,]+),(%d+)$')
  if cursor == '0' and redis.call('HLEN', key) < tonumber(start_at) then
    return
  end
  local scan = redis.call('HSCAN', key, cursor, 'COUNT', PRUNE_PER_CALL)
  local fields = scan[2]
  for i = 1, #fields, 2 do
    if fields[i] ~= PRUNE_STATE and tonumber(string.match(fields[i + 1], '^[^,]+')) <= now then
      redis.call('HDEL', key, fields[i])
    end
  end
  if scan[1] == '0' then
    start_at = string.format('%d', math.max(PRUNE_FROM, 2 * redis.call('HLEN', key)))
  end
  redis.call('HSET', key, PRUNE_STATE, scan[1] .. ',' .. start_at)
end

-- Remember operation `id`'s reply for `ttl` seconds, so a retry of it is answered, not
-- re-applied; the hash itself is kept at least `keep` seconds.
local function remember(key, id, reply, ttl, keep, now)
  prune(key, now)
  local parts = {string.format('%d', now + tonumber(ttl) * 1000)}
  for i, value in ipairs(reply) do
    parts[i + 1] = string.format('%d', value)
  end
  redis.call('HSET', key, id, table.concat(parts, ','))
  if redis.call('TTL', key) < tonumber(keep) then
    redis.call('EXPIRE', key, keep)
  end
  return reply
end
