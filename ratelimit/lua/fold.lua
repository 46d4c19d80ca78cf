-- fold: a written ledger batch's amounts for this month replace its reports' in-flight counts
-- (marks.py `fold`).
-- KEYS[1] tokens used, KEYS[2] micro-USD spent, KEYS[3] the month's ledger hash
-- ARGV[1] replica id, ARGV[2] the batch's position, ARGV[3] tokens, ARGV[4] micro-USD,
-- ARGV[5] the counters' TTL in seconds
-- Returns 0 (no month: nothing done), 1 folded, 2 already folded, 3 held for the seed under way.
local replica, at = ARGV[1], tonumber(ARGV[2])
local tokens, spend = tonumber(ARGV[3]), tonumber(ARGV[4])
if redis.call('HEXISTS', KEYS[3], 'seeding') == 1 then
  local field = 'p:' .. replica
  local held = entries(redis.call('HGET', KEYS[3], field))
  for _, e in ipairs(held) do
    if e[1] == at then
      return 3
    end
  end
  held[#held + 1] = {at, tokens, spend}
  redis.call('HSET', KEYS[3], field, joined(held))
  return 3
end
if not month_complete(KEYS[1], KEYS[2], KEYS[3]) then
  return 0
end
if mark_of(KEYS[3], replica) >= at then
  return 2
end
local generation = floor_div(at, LEDGER_SPAN)
local field = 'f:' .. replica
local kept, gone_t, gone_s = {}, 0, 0
for _, e in ipairs(entries(redis.call('HGET', KEYS[3], field))) do
  if e[1] <= generation then
    gone_t, gone_s = gone_t + e[2], gone_s + e[3]
  else
    kept[#kept + 1] = e
  end
end
if #kept > 0 then
  redis.call('HSET', KEYS[3], field, joined(kept))
else
  redis.call('HDEL', KEYS[3], field)
end
local ttl = ARGV[5]
redis.call('HSET', KEYS[3], 'm:' .. replica, string.format('%d', at))
redis.call('EXPIRE', KEYS[3], ttl)
put_counter(KEYS[1], read_counter(KEYS[1]) + tokens - gone_t, ttl)
put_counter(KEYS[2], read_counter(KEYS[2]) + spend - gone_s, ttl)
return 1
