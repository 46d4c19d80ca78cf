-- acquire: take one request and ARGV[3] tokens from both buckets, all or nothing.
-- KEYS[1] request bucket, KEYS[2] token bucket
-- ARGV[1] rpm limit, ARGV[2] tpm limit (0 = unlimited; already clamped to MAX_LIMIT)
-- ARGV[3] token cost (>= 0)
-- Returns the 8-value bucket reply (see bucket_reply).
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local b = read_buckets(KEYS[1], KEYS[2], rpm, tpm, now_ms())
return take(b, tonumber(ARGV[3]))
