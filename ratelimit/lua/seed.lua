-- seed: set each of the period's counters only where it is absent.
-- KEYS[1] tokens used, KEYS[2] micro-USD spent
-- ARGV[1] tokens, ARGV[2] micro-USD, ARGV[3] the counters' TTL in seconds
-- Returns {tokens_set, spend_set} (1 where the counter was absent and is now set).
local ttl = ARGV[3]
return {seed(KEYS[1], tonumber(ARGV[1]), ttl), seed(KEYS[2], tonumber(ARGV[2]), ttl)}
