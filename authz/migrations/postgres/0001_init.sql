CREATE TABLE workspaces (
    id text PRIMARY KEY,
    name text NOT NULL UNIQUE,
    rpm integer NOT NULL CHECK (rpm >= 0),
    tpm integer NOT NULL CHECK (tpm >= 0),
    key_limit integer NOT NULL CHECK (key_limit >= 0),
    default_completion_tokens integer NOT NULL CHECK (default_completion_tokens >= 0),
    monthly_token_quota bigint CHECK (monthly_token_quota >= 0),
    monthly_spend_cap_usd double precision CHECK (monthly_spend_cap_usd >= 0),
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
);

CREATE TABLE api_keys (
    id text PRIMARY KEY,
    workspace_id text NOT NULL REFERENCES workspaces (id),
    label text NOT NULL,
    key_hash bytea NOT NULL UNIQUE,
    mask text NOT NULL,
    created_at timestamptz NOT NULL,
    revoked_at timestamptz,
    last_used_at timestamptz,
    expires_at timestamptz
);

CREATE INDEX api_keys_workspace_idx ON api_keys (workspace_id);

CREATE TABLE audit_log (
    id bigserial PRIMARY KEY,
    at timestamptz NOT NULL,
    workspace_id text NOT NULL,
    key_id text,
    action text NOT NULL,
    actor_kind text NOT NULL,
    actor_subject text NOT NULL,
    actor_issuer text,
    actor_address text,
    detail text NOT NULL DEFAULT ''
);

CREATE INDEX audit_log_workspace_idx ON audit_log (workspace_id, at);
