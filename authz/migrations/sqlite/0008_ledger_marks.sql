-- Per workspace, period and replica: the highest ledger batch position written (see
-- ratelimit/marks.py). Written in each batch's transaction and read with the period's totals
-- in one statement, so a snapshot says exactly which batches it holds. The quota counters are
-- rebuilt from such a snapshot after Redis loses them, then only later batches are added.
CREATE TABLE usage_ledger_marks (
    workspace_id TEXT NOT NULL,
    period TEXT NOT NULL,
    replica_id TEXT NOT NULL,
    position INTEGER NOT NULL CHECK (position >= 0),
    PRIMARY KEY (workspace_id, period, replica_id)
);
