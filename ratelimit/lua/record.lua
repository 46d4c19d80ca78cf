-- record: adjust the token bucket and add usage to the period's counters, in one step, once per
-- operation id.
-- KEYS[1] token bucket, KEYS[2] tokens used, KEYS[3] micro-USD spent, KEYS[4] the workspace's
-- operations hash (see keys.py)
-- ARGV[1] tpm limit (0 = unlimited: the bucket is left alone), ARGV[2] token delta
-- ARGV[3] tokens, ARGV[4] micro-USD to add, ARGV[5] the counters' TTL in seconds
-- ARGV[6] how long to remember the operation, in seconds, ARGV[7] the operation id
-- Returns {tokens_used, spend_used, existed (which counters existed before: 1 tokens + 2 spend,
-- as prelude's existed_mask)}; a repeat of the operation returns the first reply.
local now = now_ms()
local done = recall(KEYS[4], ARGV[7], now)
if done then
  return done
end
local tpm, delta = tonumber(ARGV[1]), tonumber(ARGV[2])
if tpm > 0 and delta ~= 0 then
  adjust(KEYS[1], tpm, delta, now)
end
local existed = existed_mask(redis.call('EXISTS', KEYS[2]) == 1,
  redis.call('EXISTS', KEYS[3]) == 1)
local ttl = ARGV[5]
local reply = {record(KEYS[2], tonumber(ARGV[3]), ttl), record(KEYS[3], tonumber(ARGV[4]), ttl),
  existed}
-- The operations hash lives as long as the counters it guards.
return remember(KEYS[4], ARGV[7], reply, ARGV[6], ttl, now)
