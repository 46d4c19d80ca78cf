-- seed_begin: hold an incomplete month for one seeder (marks.py `seed_begin`).
-- KEYS[1] tokens used, KEYS[2] micro-USD spent, KEYS[3] the month's ledger hash
-- ARGV[1] the seeder's token, ARGV[2] how long to hold, in milliseconds
-- Returns 0 (complete: nothing to seed), 1 (held for this token), 2 (held by another seeder).
if month_complete(KEYS[1], KEYS[2], KEYS[3]) then
  return 0
end
local owner = redis.call('HGET', KEYS[3], 'seeding')
if owner then
  if owner == ARGV[1] then
    return 1
  end
  return 2
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('HSET', KEYS[3], 'seeding', ARGV[1])
redis.call('PEXPIRE', KEYS[3], ARGV[2])
return 1
