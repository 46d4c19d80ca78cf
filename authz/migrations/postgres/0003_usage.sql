CREATE TABLE model_prices (
    model text PRIMARY KEY,
    input_per_1m_usd double precision NOT NULL CHECK (input_per_1m_usd >= 0),
    output_per_1m_usd double precision NOT NULL CHECK (output_per_1m_usd >= 0),
    updated_at timestamptz NOT NULL
);

-- The billing ledger: one row per hour, workspace, key and model. Flushes add to it.
CREATE TABLE usage_hourly (
    hour timestamptz NOT NULL,
    workspace_id text NOT NULL,
    key_id text NOT NULL,
    model text NOT NULL,
    requests bigint NOT NULL DEFAULT 0,
    prompt_tokens bigint NOT NULL DEFAULT 0,
    completion_tokens bigint NOT NULL DEFAULT 0,
    errors_4xx bigint NOT NULL DEFAULT 0,
    errors_5xx bigint NOT NULL DEFAULT 0,
    spend_usd double precision NOT NULL DEFAULT 0,
    PRIMARY KEY (hour, workspace_id, key_id, model)
);

CREATE INDEX usage_hourly_workspace_idx ON usage_hourly (workspace_id, hour);
CREATE INDEX usage_hourly_key_idx ON usage_hourly (key_id, hour);

-- A flush is applied at most once: a retry of the same batch id is a no-op.
CREATE TABLE usage_batches (
    batch_id text PRIMARY KEY,
    applied_at timestamptz NOT NULL
);
