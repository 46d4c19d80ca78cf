-- record_month: like record, for a report the ledger will hold in one of its replica's batches
-- (marks.py `record`): counted only on a complete month and only while the report's batch is
-- not folded, once per operation id.
-- KEYS[1] token bucket, KEYS[2] tokens used, KEYS[3] micro-USD spent, KEYS[4] the workspace's
-- operations hash (see keys.py), KEYS[5] the month's ledger hash
-- ARGV[1] tpm limit (0 = unlimited), ARGV[2] token delta, ARGV[3] tokens, ARGV[4] micro-USD,
-- ARGV[5] the counters' TTL in seconds, ARGV[6] how long to remember the operation, in seconds,
-- ARGV[7] replica id, ARGV[8] the report's generation, ARGV[9] the operation id
-- Returns {tokens_used, spend_used, recorded (0 month incomplete: nothing done, not remembered;
-- 1 counted; 2 skipped: its batch is already counted)}; a repeat returns the first reply.
local now = now_ms()
local done = recall(KEYS[4], ARGV[9], now)
if done then
  return done
end
if not month_complete(KEYS[2], KEYS[3], KEYS[5]) then
  return {read_counter(KEYS[2]) or 0, read_counter(KEYS[3]) or 0, 0}
end
local tpm, delta = tonumber(ARGV[1]), tonumber(ARGV[2])
if tpm > 0 and delta ~= 0 then
  adjust(KEYS[1], tpm, delta, now)
end
local ttl = ARGV[5]
local replica, generation = ARGV[7], tonumber(ARGV[8])
local tokens, spend = tonumber(ARGV[3]), tonumber(ARGV[4])
local reply
if mark_of(KEYS[5], replica) >= generation * LEDGER_SPAN then
  reply = {read_counter(KEYS[2]), read_counter(KEYS[3]), 2}
else
  local field = 'f:' .. replica
  local flying = entries(redis.call('HGET', KEYS[5], field))
  local found = false
  for _, e in ipairs(flying) do
    if e[1] == generation then
      e[2], e[3], found = e[2] + tokens, e[3] + spend, true
      break
    end
  end
  if not found then
    flying[#flying + 1] = {generation, tokens, spend}
  end
  redis.call('HSET', KEYS[5], field, joined(flying))
  reply = {record(KEYS[2], tokens, ttl), record(KEYS[3], spend, ttl), 1}
end
redis.call('EXPIRE', KEYS[5], ttl)
-- The operations hash lives as long as the counters it guards.
return remember(KEYS[4], ARGV[9], reply, ARGV[6], ttl, now)
