-- Workspace RPM/TPM token buckets and monthly usage counters, in one atomic step per call.
--
-- This is the Redis twin of ratelimit/bucket.py (the buckets) and ratelimit/quota.py (the
-- quota); read those modules' docstrings for the rules and the integer scheme. Every function
-- here mirrors the Python function of the same name, and a property test runs both on the same
-- inputs and requires identical replies and identical stored state.
--
-- KEYS[1]  the workspace's request bucket  (hash: l = level in units, t = updated at, in ms)
-- KEYS[2]  the workspace's token bucket    (all keys share the hash tag {ws:<id>}: one slot)
-- KEYS[3]  tokens used in the period       (integer string; modes acquire_quota, record, seed)
-- KEYS[4]  micro-USD spent in the period   (integer string; same modes)
-- ARGV[1]  mode: "acquire", "acquire_quota", "adjust", "record" or "seed"
-- ARGV[2]  rpm limit, ARGV[3] tpm limit (0 = unlimited; already clamped to MAX_LIMIT)
-- ARGV[4]  acquire*: the token cost for the buckets (>= 0);
--          adjust, record: the token delta (> 0 charge, < 0 refund); seed: ignored
-- ARGV[5]  optional "now" in ms ('' = none). FOR TESTS ONLY: it makes the clock deterministic.
--          Production never passes it, and the script reads the server's clock with TIME.
-- ARGV[6]  acquire_quota, record, seed: tokens (the usage to check, add or seed)
-- ARGV[7]  acquire_quota, record, seed: micro-USD (likewise)
-- ARGV[8]  acquire_quota: token quota (-1 = none); record, seed: counter TTL in seconds
-- ARGV[9]  acquire_quota: spend cap in micro-USD (-1 = none)
--
-- acquire returns {allowed, denied_by (0 none, 1 requests, 2 tokens), too_large, retry_ms,
--                  req_remaining, req_reset_ms, tok_remaining, tok_reset_ms}
-- acquire_quota returns the same 8, then {quota_exceeded (0 none, 1 tokens, 2 spend),
--                  tokens_used, spend_used, known (1 when both counters existed)}
-- adjust returns {tok_remaining, tok_reset_ms}
-- record returns {tokens_used, spend_used, known (1 when both counters existed before)}
-- seed returns {tokens_set, spend_set} (1 where the counter was absent and is now set)
--
-- Lua 5.1 numbers are doubles: every value stays an integer below 2^53, so all arithmetic here
-- is exact, and numbers are written back with %d because tostring would keep only 14 digits.

local UNITS_PER_TOKEN = 60000
local TTL_MARGIN_MS = 1000
local MAX_COUNTER = 1000000000000000 -- 10^15

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

local function now_ms()
  local override = ARGV[5]
  if override ~= nil and override ~= '' then
    return tonumber(override)
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
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
  local ttl = ms_to_reach(limit, level, capacity(limit)) + TTL_MARGIN_MS
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
local function adjust(tpm, delta, now)
  local cap = capacity(tpm)
  local level, updated = level_at(KEYS[2], tpm, now)
  level = math.max(-cap, math.min(cap, level - delta * UNITS_PER_TOKEN))
  store(KEYS[2], tpm, level, updated)
  return level
end

-- A usage counter, or nil when it does not exist. Values beyond MAX_COUNTER (never written by
-- this script) read as MAX_COUNTER, so the sums below stay exact.
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

local function seed(key, amount, ttl)
  local set = redis.call('SET', key, string.format('%d', math.min(amount, MAX_COUNTER)), 'NX',
    'EX', ttl)
  if set then
    return 1
  end
  return 0
end

local mode = ARGV[1]
local rpm = tonumber(ARGV[2])
local tpm = tonumber(ARGV[3])
local amount = tonumber(ARGV[4])
local now = now_ms()

if mode == 'adjust' then
  if tpm == 0 then
    return {0, 0}
  end
  local level = adjust(tpm, amount, now)
  return {remaining(level), reset_ms(tpm, level)}
end

if mode == 'record' then
  if tpm > 0 and amount ~= 0 then
    adjust(tpm, amount, now)
  end
  local known = 0
  if redis.call('EXISTS', KEYS[3], KEYS[4]) == 2 then
    known = 1
  end
  local ttl = ARGV[8]
  return {record(KEYS[3], tonumber(ARGV[6]), ttl), record(KEYS[4], tonumber(ARGV[7]), ttl), known}
end

if mode == 'seed' then
  local ttl = ARGV[8]
  return {seed(KEYS[3], tonumber(ARGV[6]), ttl), seed(KEYS[4], tonumber(ARGV[7]), ttl)}
end

if mode ~= 'acquire' and mode ~= 'acquire_quota' then
  return redis.error_reply('unknown mode ' .. tostring(mode))
end

local req_level, req_updated, tok_level, tok_updated
if rpm > 0 then
  req_level, req_updated = level_at(KEYS[1], rpm, now)
end
if tpm > 0 then
  tok_level, tok_updated = level_at(KEYS[2], tpm, now)
end

local tokens_used, spend_used, known
if mode == 'acquire_quota' then
  local t, s = read_counter(KEYS[3]), read_counter(KEYS[4])
  tokens_used, spend_used, known = t or 0, s or 0, 0
  if t ~= nil and s ~= nil then
    known = 1
  end
end

local function reply(allowed, denied_by, too_large, retry_ms, quota_exceeded)
  local r = {allowed, denied_by, too_large, retry_ms, 0, 0, 0, 0}
  if rpm > 0 then
    r[5] = remaining(req_level)
    r[6] = reset_ms(rpm, req_level)
  end
  if tpm > 0 then
    r[7] = remaining(tok_level)
    r[8] = reset_ms(tpm, tok_level)
  end
  if mode == 'acquire_quota' then
    r[9], r[10], r[11], r[12] = quota_exceeded, tokens_used, spend_used, known
  end
  return r
end

-- The quota comes first: a request it denies debits no bucket.
if mode == 'acquire_quota' then
  local token_quota, spend_cap = tonumber(ARGV[8]), tonumber(ARGV[9])
  -- Used up already (even a request that adds nothing waits), or would not fit.
  if token_quota >= 0 and (tokens_used >= token_quota or tokens_used + tonumber(ARGV[6]) > token_quota) then
    return reply(0, 0, 0, 0, 1)
  end
  if spend_cap >= 0 and (spend_used >= spend_cap or spend_used + tonumber(ARGV[7]) > spend_cap) then
    return reply(0, 0, 0, 0, 2)
  end
end

if tpm > 0 and amount > tpm then
  return reply(0, 2, 1, 0, 0)
end

local req_need = UNITS_PER_TOKEN
local tok_need = amount * UNITS_PER_TOKEN
local req_wait, tok_wait = 0, 0
if rpm > 0 then
  req_wait = ms_to_reach(rpm, req_level, req_need)
end
if tpm > 0 then
  tok_wait = ms_to_reach(tpm, tok_level, tok_need)
end

if req_wait > 0 or tok_wait > 0 then
  local denied_by = 2
  if req_wait > 0 then
    denied_by = 1
  end
  return reply(0, denied_by, 0, math.max(req_wait, tok_wait), 0)
end

if rpm > 0 then
  req_level = req_level - req_need
  store(KEYS[1], rpm, req_level, req_updated)
end
if tpm > 0 then
  tok_level = tok_level - tok_need
  store(KEYS[2], tpm, tok_level, tok_updated)
end
return reply(1, 0, 0, 0, 0)
