-- Beside the ledger, for the console's Observability page (authz/usage/observations.py).
-- Latency: how many requests per hour, workspace and key fell in each fixed bucket
-- (authz/usage/latency.py), so percentiles add up over any range. Flushes add to it.
CREATE TABLE latency_hourly (
    hour timestamptz NOT NULL,
    workspace_id text NOT NULL,
    key_id text NOT NULL,
    bucket integer NOT NULL CHECK (bucket >= 0),
    requests bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (workspace_id, hour, key_id, bucket)
);

-- Denials per hour, workspace, key ('' when unknown) and reason.
CREATE TABLE denials_hourly (
    hour timestamptz NOT NULL,
    workspace_id text NOT NULL,
    key_id text NOT NULL,
    reason text NOT NULL,
    requests bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (workspace_id, hour, key_id, reason)
);

-- An observation flush is applied at most once, like a ledger batch.
CREATE TABLE observation_batches (
    batch_id text PRIMARY KEY,
    applied_at timestamptz NOT NULL
);
