-- seed_finish: install a ledger snapshot read under this seeder's hold (marks.py `seed_finish`).
-- KEYS[1] tokens used, KEYS[2] micro-USD spent, KEYS[3] the month's ledger hash
-- ARGV[1] the seeder's token, ARGV[2] the snapshot's tokens, ARGV[3] its micro-USD,
-- ARGV[4] the counters' TTL in seconds, then pairs (replica id, its mark in the snapshot)
-- Returns 1 (installed), 0 (the hold is gone: nothing done, start over).
if redis.call('HGET', KEYS[3], 'seeding') ~= ARGV[1] then
  return 0
end
local tokens, spend = tonumber(ARGV[2]), tonumber(ARGV[3])
local marks, order = {}, {}
for i = 5, #ARGV, 2 do
  marks[ARGV[i]] = tonumber(ARGV[i + 1])
  order[#order + 1] = ARGV[i]
end
local fields = redis.call('HGETALL', KEYS[3])
for i = 1, #fields, 2 do
  if string.sub(fields[i], 1, 2) == 'p:' then
    local replica = string.sub(fields[i], 3)
    if marks[replica] == nil then
      marks[replica] = -1
      order[#order + 1] = replica
    end
    for _, e in ipairs(entries(fields[i + 1])) do
      if e[1] > marks[replica] then
        tokens, spend, marks[replica] = tokens + e[2], spend + e[3], e[1]
      end
    end
  end
end
local ttl = ARGV[4]
redis.call('DEL', KEYS[3])
local args = {'ok', '1'}
for _, replica in ipairs(order) do
  if marks[replica] >= 0 then
    args[#args + 1] = 'm:' .. replica
    args[#args + 1] = string.format('%d', marks[replica])
  end
end
redis.call('HSET', KEYS[3], unpack(args))
redis.call('EXPIRE', KEYS[3], ttl)
put_counter(KEYS[1], tokens, ttl)
put_counter(KEYS[2], spend, ttl)
return 1
