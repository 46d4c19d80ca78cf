-- Unknown usage is never free: a request whose usage the upstream did not report is charged
-- its reservation, and the ledger keeps those estimated tokens apart from reported ones.
ALTER TABLE usage_hourly ADD COLUMN estimated_requests bigint NOT NULL DEFAULT 0;
ALTER TABLE usage_hourly ADD COLUMN estimated_tokens bigint NOT NULL DEFAULT 0;

-- Per workspace: a stream that will not report usage is estimated, or refused (400).
ALTER TABLE workspaces ADD COLUMN streaming_usage text NOT NULL DEFAULT 'estimate'
    CHECK (streaming_usage IN ('estimate', 'require'));
