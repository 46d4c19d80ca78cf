-- Secrets that sign Check's reservations (HMAC-SHA256), so the access-log service can tell an
-- entry our Check produced from one anybody could send. `authz migrate` inserts the first one;
-- `authz signing-key rotate` adds the next and gives the old one `retires_at`.
CREATE TABLE signing_keys (
    id text PRIMARY KEY,
    secret_hex text NOT NULL,
    created_at timestamptz NOT NULL,
    retires_at timestamptz
);
