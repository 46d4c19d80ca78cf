-- The buckets' clock: the Redis server's own, so every replica shares one time line.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
