-- acquire_quota: like acquire, after checking the period's quota; the counters are only read.
-- KEYS[1] request bucket, KEYS[2] token bucket, KEYS[3] tokens used, KEYS[4] micro-USD spent
-- ARGV[1] rpm limit, ARGV[2] tpm limit, ARGV[3] token cost for the buckets (as acquire)
-- ARGV[4] tokens and ARGV[5] micro-USD this request would add to the counters
-- ARGV[6] token quota, ARGV[7] spend cap in micro-USD (-1 = none)
-- Returns the 8-value bucket reply, then {quota_exceeded (0 none, 1 tokens, 2 spend),
-- tokens_used, spend_used, existed (which counters existed: 1 tokens + 2 spend; 3 = known)}. A missing counter never
-- admits a quota that limits something: unless the quota already denies, the reply is "not allowed, nothing debited, known 0",
-- and the caller seeds the counters and asks again (quota.py's rules).
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local b = read_buckets(KEYS[1], KEYS[2], rpm, tpm, now_ms())
local t, s = read_counter(KEYS[3]), read_counter(KEYS[4])
local tokens_used, spend_used = t or 0, s or 0
local existed = existed_mask(t ~= nil, s ~= nil)
local known = 0
if existed == 3 then
  known = 1
end
local tokens, spend = tonumber(ARGV[4]), tonumber(ARGV[5])
local token_quota, spend_cap = tonumber(ARGV[6]), tonumber(ARGV[7])
-- The quota comes first: a request it denies debits no bucket. Used up already (even a request
-- that adds nothing waits), or would not fit.
local r, exceeded
if token_quota >= 0 and (tokens_used >= token_quota or tokens_used + tokens > token_quota) then
  r, exceeded = bucket_reply(b, 0, 0, 0, 0), 1
elseif spend_cap >= 0 and (spend_used >= spend_cap or spend_used + spend > spend_cap) then
  r, exceeded = bucket_reply(b, 0, 0, 0, 0), 2
elseif known == 0 and (token_quota >= 0 or spend_cap >= 0) then
  r, exceeded = bucket_reply(b, 0, 0, 0, 0), 0
else
  r, exceeded = take(b, tonumber(ARGV[3])), 0
end
r[9], r[10], r[11], r[12] = exceeded, tokens_used, spend_used, existed
return r
