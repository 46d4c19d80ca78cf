-- Beside the ledger, for the console's Observability page (authz/usage/observations.py).
-- Latency: how many requests per hour, workspace and key fell in each fixed bucket
-- (authz/usage/latency.py), so percentiles add up over any range. Flushes add to it.
CREATE TABLE latency_hourly (
    hour TEXT NOT NULL,
    workspace_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    bucket INTEGER NOT NULL CHECK (bucket >= 0),
    requests INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (workspace_id, hour, key_id, bucket)
);

-- Denials per hour, workspace, key ('' when unknown) and reason.
CREATE TABLE denials_hourly (
    hour TEXT NOT NULL,
    workspace_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (workspace_id, hour, key_id, reason)
);

-- An observation flush is applied at most once, like a ledger batch.
CREATE TABLE observation_batches (
    batch_id TEXT PRIMARY KEY,
    applied_at TEXT NOT NULL
);
