-- Workspace RPM/TPM token buckets, checked and debited in one atomic step.
--
-- This is the Redis twin of ratelimit/bucket.py; read that module's docstring for the rules and
-- the integer scheme. Every function here mirrors the Python function of the same name, and a
-- property test runs both on the same inputs and requires identical replies.
--
-- KEYS[1]  the workspace's request bucket  (hash: l = level in units, t = updated at, in ms)
-- KEYS[2]  the workspace's token bucket    (same hash tag {ws:<id>}: one slot on a cluster)
-- ARGV[1]  mode: "acquire" or "adjust"
-- ARGV[2]  rpm limit, ARGV[3] tpm limit (0 = unlimited; already clamped to MAX_LIMIT)
-- ARGV[4]  acquire: the token cost (>= 0);  adjust: the token delta (> 0 charge, < 0 refund)
-- ARGV[5]  optional "now" in ms. FOR TESTS ONLY: it makes the clock deterministic. Production
--          never passes it, and the script reads the server's clock with TIME.
--
-- acquire returns {allowed, denied_by (0 none, 1 requests, 2 tokens), too_large, retry_ms,
--                  req_remaining, req_reset_ms, tok_remaining, tok_reset_ms}
-- adjust returns {tok_remaining, tok_reset_ms}
--
-- Lua 5.1 numbers are doubles: every value stays an integer below 2^53, so all arithmetic here
-- is exact, and numbers are written back with %d because tostring would keep only 14 digits.

local UNITS_PER_TOKEN = 60000
local TTL_MARGIN_MS = 1000

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

local mode = ARGV[1]
local rpm = tonumber(ARGV[2])
local tpm = tonumber(ARGV[3])
local amount = tonumber(ARGV[4])
local now = now_ms()

if mode == 'adjust' then
  if tpm == 0 then
    return {0, 0}
  end
  local cap = capacity(tpm)
  local level, updated = level_at(KEYS[2], tpm, now)
  level = math.max(-cap, math.min(cap, level - amount * UNITS_PER_TOKEN))
  store(KEYS[2], tpm, level, updated)
  return {remaining(level), reset_ms(tpm, level)}
end

if mode ~= 'acquire' then
  return redis.error_reply('unknown mode ' .. tostring(mode))
end

local req_level, req_updated, tok_level, tok_updated
if rpm > 0 then
  req_level, req_updated = level_at(KEYS[1], rpm, now)
end
if tpm > 0 then
  tok_level, tok_updated = level_at(KEYS[2], tpm, now)
end

local function reply(allowed, denied_by, too_large, retry_ms)
  local r = {allowed, denied_by, too_large, retry_ms, 0, 0, 0, 0}
  if rpm > 0 then
    r[5] = remaining(req_level)
    r[6] = reset_ms(rpm, req_level)
  end
  if tpm > 0 then
    r[7] = remaining(tok_level)
    r[8] = reset_ms(tpm, tok_level)
  end
  return r
end

if tpm > 0 and amount > tpm then
  return reply(0, 2, 1, 0)
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
  return reply(0, denied_by, 0, math.max(req_wait, tok_wait))
end

if rpm > 0 then
  req_level = req_level - req_need
  store(KEYS[1], rpm, req_level, req_updated)
end
if tpm > 0 then
  tok_level = tok_level - tok_need
  store(KEYS[2], tpm, tok_level, tok_updated)
end
return reply(1, 0, 0, 0)
