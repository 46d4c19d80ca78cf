CREATE TABLE model_prices (
    model TEXT PRIMARY KEY,
    input_per_1m_usd REAL NOT NULL CHECK (input_per_1m_usd >= 0),
    output_per_1m_usd REAL NOT NULL CHECK (output_per_1m_usd >= 0),
    updated_at TEXT NOT NULL
);

-- The billing ledger: one row per hour, workspace, key and model. Flushes add to it.
CREATE TABLE usage_hourly (
    hour TEXT NOT NULL,
    workspace_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    model TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    errors_4xx INTEGER NOT NULL DEFAULT 0,
    errors_5xx INTEGER NOT NULL DEFAULT 0,
    spend_usd REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (hour, workspace_id, key_id, model)
);

CREATE INDEX usage_hourly_workspace_idx ON usage_hourly (workspace_id, hour);
CREATE INDEX usage_hourly_key_idx ON usage_hourly (key_id, hour);

-- A flush is applied at most once: a retry of the same batch id is a no-op.
CREATE TABLE usage_batches (
    batch_id TEXT PRIMARY KEY,
    applied_at TEXT NOT NULL
);
