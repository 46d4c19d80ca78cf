CREATE TABLE workspaces (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    rpm INTEGER NOT NULL CHECK (rpm >= 0),
    tpm INTEGER NOT NULL CHECK (tpm >= 0),
    key_limit INTEGER NOT NULL CHECK (key_limit >= 0),
    default_completion_tokens INTEGER NOT NULL CHECK (default_completion_tokens >= 0),
    monthly_token_quota INTEGER CHECK (monthly_token_quota >= 0),
    monthly_spend_cap_usd REAL CHECK (monthly_spend_cap_usd >= 0),
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);

CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    workspace_id TEXT NOT NULL REFERENCES workspaces (id),
    label TEXT NOT NULL,
    key_hash BLOB NOT NULL UNIQUE,
    mask TEXT NOT NULL,
    created_at TEXT NOT NULL,
    revoked_at TEXT,
    last_used_at TEXT,
    expires_at TEXT
);

CREATE INDEX api_keys_workspace_idx ON api_keys (workspace_id);

CREATE TABLE audit_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    workspace_id TEXT NOT NULL,
    key_id TEXT,
    action TEXT NOT NULL,
    actor_kind TEXT NOT NULL,
    actor_subject TEXT NOT NULL,
    actor_issuer TEXT,
    actor_address TEXT,
    detail TEXT NOT NULL DEFAULT ''
);

CREATE INDEX audit_log_workspace_idx ON audit_log (workspace_id, at);

-- The embedded store has no LISTEN/NOTIFY: writers append here in the same transaction and
-- every server process polls it, so a CLI revoke reaches a running sidecar within a poll.
CREATE TABLE changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    payload TEXT NOT NULL,
    at TEXT NOT NULL
);
