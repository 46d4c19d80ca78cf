-- Sent in front of a script called in its one-key form (ratelimit/redis_cluster.py): on a Redis
-- Cluster node importing the slot, after ASKING, a script naming several keys that do not all
-- exist yet gets TRYAGAIN, one naming a single key runs. The call then names only KEYS[1] and
-- passes the rest first in ARGV, after their count: moved back here, the script body sees the
-- KEYS and ARGV it documents.
local moved = tonumber(table.remove(ARGV, 1))
for _ = 1, moved do
  KEYS[#KEYS + 1] = table.remove(ARGV, 1)
end
