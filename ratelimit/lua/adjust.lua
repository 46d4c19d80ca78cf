-- adjust: charge (delta > 0) or refund (delta < 0) the token bucket, once per operation id.
-- KEYS[1] token bucket, KEYS[2] the workspace's operations hash (see keys.py)
-- ARGV[1] tpm limit (> 0), ARGV[2] token delta, ARGV[3] how long to remember the operation (s)
-- ARGV[4] the operation id
-- Returns {tok_remaining, tok_reset_ms}; a repeat of the operation returns the first reply.
local now = now_ms()
local done = recall(KEYS[2], ARGV[4], now)
if done then
  return done
end
local tpm = tonumber(ARGV[1])
local level = adjust(KEYS[1], tpm, tonumber(ARGV[2]), now)
-- The hash is kept at least the operation's minute (record keeps it as long as the counters).
return remember(KEYS[2], ARGV[4], {remaining(level), reset_ms(tpm, level)}, ARGV[3], ARGV[3], now)
