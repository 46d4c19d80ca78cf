-- The month counters' ledger marks: shared helpers of record_month, fold, seed_begin and
-- seed_finish, the Redis twin of ratelimit/marks.py (read its docstring for the scheme and why
-- it is exact). Each function mirrors the Python one of the same name.
--
-- The ledger hash of a workspace and period: `ok` = 1 once seeded; `seeding` = the token of the
-- seed under way; `m:<replica>` = the position folded; `f:<replica>` = reports counted but not
-- folded, per generation; `p:<replica>` = folds held during a seed. Lists are "n:t:s;n:t:s".

local LEDGER_SPAN = 1048576 -- 2^20 positions per generation

local function entries(text)
  local list = {}
  if text then
    for n, t, s in string.gmatch(text, '(%-?%d+):(%d+):(%d+)') do
      list[#list + 1] = {tonumber(n), tonumber(t), tonumber(s)}
    end
  end
  return list
end

local function joined(list)
  local parts = {}
  for i, e in ipairs(list) do
    parts[i] = string.format('%d:%d:%d', e[1], e[2], e[3])
  end
  return table.concat(parts, ';')
end

-- Both counters exist and the hash says the month was seeded.
local function month_complete(tokens_key, spend_key, ledger_key)
  return redis.call('HGET', ledger_key, 'ok') == '1' and redis.call('EXISTS', tokens_key) == 1
    and redis.call('EXISTS', spend_key) == 1
end

local function mark_of(ledger_key, replica)
  local held = redis.call('HGET', ledger_key, 'm:' .. replica)
  if held then
    return tonumber(held)
  end
  return -1
end

local function put_counter(key, value, ttl)
  value = math.max(0, math.min(value, MAX_COUNTER))
  redis.call('SET', key, string.format('%d', value), 'EX', ttl)
end
