-- Shadow mode (CONTRACT §3): a shadow workspace's limits are evaluated but never refuse.
ALTER TABLE workspaces ADD COLUMN enforcement TEXT NOT NULL DEFAULT 'enforce'
    CHECK (enforcement IN ('enforce', 'shadow'));
