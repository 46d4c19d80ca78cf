"""The one SQL store: every business rule, written once for SQLite and PostgreSQL alike.

Keys, rotation, the key limit, workspace limits, audit texts, the ledger upsert and the
change announcements live here; `Dialect` subclasses only say how to talk to their database.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from authz.keys import new_workspace_id
from authz.migrations import load_migrations
from authz.models import (
    Actor,
    AuditEntry,
    ModelPrice,
    NewWorkspace,
    UsageRow,
    Workspace,
    WorkspaceUpdate,
)
from authz.store.base import (
    PRICES_AUDIT,
    Change,
    ChangeKind,
    Conflict,
    LedgerMark,
    LedgerSnapshot,
    NotFound,
    SchemaMissing,
    utc_now,
)
from authz.store.common import (
    USAGE_COLUMNS,
    USAGE_UPSERT,
    apply_update,
    check_new_workspace,
    check_price,
    price_change,
    usage_filters,
    usage_values,
    workspace_change,
)
from authz.store.dialect import Tx
from authz.store.rows import (
    AUDIT_COLUMNS,
    WORKSPACE_COLUMNS,
    audit_from_row,
    price_from_row,
    usage_from_row,
)
from authz.store.sql_ledger import raise_marks, read_snapshot
from authz.store.sql_observations import ObservationRules
from authz.store.sql_signing import SigningKeyRules


class SqlStore(ObservationRules, SigningKeyRules):
    """The Store protocol on a SQL database; a subclass supplies the dialect."""

    async def migrate(self) -> list[int]:
        async def work(tx: Tx) -> list[int]:
            await self._lock_migrations(tx)
            await tx.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                f"name TEXT NOT NULL, applied_at {self.time_type} NOT NULL)"
            )
            done = {r["version"] for r in await tx.fetch("SELECT version FROM schema_migrations")}
            applied: list[int] = []
            for migration in load_migrations(self.name):
                if migration.version in done:
                    continue
                await self._run_script(tx, migration.sql)
                await tx.execute(
                    "INSERT INTO schema_migrations VALUES (?, ?, ?)",
                    migration.version,
                    migration.name,
                    self._t(utc_now()),
                )
                applied.append(migration.version)
            await self._ensure_signing_key(tx)
            return applied

        return await self._write(work)

    async def ping(self) -> None:
        """Reachable and migrated: a replica without the schema cannot authorize."""
        row = await self._read(
            lambda tx: tx.fetchrow("SELECT max(version) AS version FROM schema_migrations")
        )
        version = None if row is None else row["version"]
        latest = load_migrations(self.name)[-1].version
        if version is None or version < latest:
            raise SchemaMissing(
                f"the database schema is at version {version}, {latest} is needed: "
                "run `authz migrate`"
            )

    async def get_workspace(self, workspace_id: str) -> Workspace | None:
        row = await self._read(
            lambda tx: tx.fetchrow(
                f"SELECT {WORKSPACE_COLUMNS} FROM workspaces WHERE id = ?", workspace_id
            )
        )
        return None if row is None else self._workspace(row)

    async def list_workspaces(self) -> list[Workspace]:
        rows = await self._read_list(
            f"SELECT {WORKSPACE_COLUMNS} FROM workspaces ORDER BY created_at"
        )
        return [self._workspace(row) for row in rows]

    async def create_workspace(self, new: NewWorkspace, *, actor: Actor) -> Workspace:
        new = check_new_workspace(new)
        now = utc_now()
        workspace_id = new_workspace_id()

        async def work(tx: Tx) -> Workspace:
            await tx.execute(
                f"INSERT INTO workspaces ({WORKSPACE_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                workspace_id,
                new.name,
                new.rpm,
                new.tpm,
                new.key_limit,
                new.default_completion_tokens,
                new.monthly_token_quota,
                new.monthly_spend_cap_usd,
                self._t(now),
                self._t(now),
                new.enforcement.value,
                new.streaming_usage.value,
            )
            await self._audit(tx, now, workspace_id, None, "workspace.create", actor, new.name)
            return await self._locked_workspace(tx, workspace_id)

        try:
            return await self._write(work)
        except Conflict as error:
            raise Conflict(f"a workspace named {new.name!r} already exists") from error

    async def update_workspace(
        self, workspace_id: str, update: WorkspaceUpdate, *, actor: Actor
    ) -> Workspace:
        now = utc_now()

        async def work(tx: Tx) -> Workspace:
            current = await self._locked_workspace(tx, workspace_id)
            updated = apply_update(current, update, updated_at=now)
            await tx.execute(
                "UPDATE workspaces SET name = ?, rpm = ?, tpm = ?, key_limit = ?, "
                "default_completion_tokens = ?, monthly_token_quota = ?, "
                "monthly_spend_cap_usd = ?, enforcement = ?, streaming_usage = ?, updated_at = ? "
                "WHERE id = ?",
                updated.name,
                updated.rpm,
                updated.tpm,
                updated.key_limit,
                updated.default_completion_tokens,
                updated.monthly_token_quota,
                updated.monthly_spend_cap_usd,
                updated.enforcement.value,
                updated.streaming_usage.value,
                self._t(now),
                workspace_id,
            )
            detail = workspace_change(current, updated)
            await self._audit(tx, now, workspace_id, None, "workspace.update", actor, detail)
            await self._announce(tx, now, Change(ChangeKind.WORKSPACE, workspace_id))
            return updated

        try:
            return await self._write(work)
        except Conflict as error:
            raise Conflict(f"a workspace named {update.name!r} already exists") from error

    async def list_audit(self, workspace_id: str) -> list[AuditEntry]:
        rows = await self._read_list(
            f"SELECT {AUDIT_COLUMNS} FROM audit_log WHERE workspace_id = ? ORDER BY id",
            workspace_id,
        )
        return [audit_from_row(row, self._parse_time) for row in rows]

    async def usage_report(
        self,
        *,
        workspace_id: str | None = None,
        key_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[UsageRow]:
        where, params = usage_filters(
            workspace_id=workspace_id,
            key_id=key_id,
            since=None if since is None else self._t(since),
            until=None if until is None else self._t(until),
        )
        rows = await self._read_list(
            f"SELECT {USAGE_COLUMNS} FROM usage_hourly{where} "
            "ORDER BY hour, workspace_id, key_id, model",
            *params,
        )
        return [usage_from_row(row, self._parse_time) for row in rows]

    async def apply_usage_batch(
        self, batch_id: str, rows: Sequence[UsageRow], *, mark: LedgerMark | None = None
    ) -> bool:
        # One fixed row order for every writer: concurrent replicas then take the rows' locks
        # in the same order and cannot deadlock each other.
        ordered = sorted(rows, key=lambda r: (r.workspace_id, r.hour, r.key_id, r.model))
        values = [usage_values(r, self._t) for r in ordered]

        async def work(tx: Tx) -> bool:
            inserted = await tx.execute(
                "INSERT INTO usage_batches (batch_id, applied_at) VALUES (?, ?) "
                "ON CONFLICT (batch_id) DO NOTHING",
                batch_id,
                self._t(utc_now()),
            )
            if not inserted:
                return False
            await tx.executemany(
                f"INSERT INTO usage_hourly ({USAGE_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) " + USAGE_UPSERT,
                values,
            )
            if mark is not None:
                await raise_marks(tx, ordered, mark)
            return True

        # The batch id makes a rerun after a dropped connection count once.
        return await self._write(work, idempotent=True)

    async def ledger_snapshot(self, workspace_id: str, period: str) -> LedgerSnapshot:
        return await self._read(lambda tx: read_snapshot(tx, workspace_id, period, self._t))

    async def period_totals(
        self, workspace_id: str, since: datetime, until: datetime
    ) -> tuple[int, float]:
        row = await self._read(
            lambda tx: tx.fetchrow(
                "SELECT coalesce(sum(prompt_tokens + completion_tokens + estimated_tokens), 0) "
                "AS tokens, "
                "coalesce(sum(spend_usd), 0) AS spend FROM usage_hourly "
                "WHERE workspace_id = ? AND hour >= ? AND hour < ?",
                workspace_id,
                self._t(since),
                self._t(until),
            )
        )
        assert row is not None
        return int(row["tokens"]), float(row["spend"])

    async def list_prices(self) -> list[ModelPrice]:
        rows = await self._read_list(
            "SELECT model, input_per_1m_usd, output_per_1m_usd, updated_at FROM model_prices "
            "ORDER BY model"
        )
        return [price_from_row(row, self._parse_time) for row in rows]

    async def set_price(self, price: ModelPrice, *, actor: Actor) -> ModelPrice:
        price = check_price(price)
        now = utc_now()

        async def work(tx: Tx) -> None:
            row = await tx.fetchrow(
                "SELECT model, input_per_1m_usd, output_per_1m_usd, updated_at FROM model_prices "
                "WHERE model = ?" + self.for_update,
                price.model,
            )
            old = None if row is None else price_from_row(row, self._parse_time)
            await tx.execute(
                "INSERT INTO model_prices VALUES (?, ?, ?, ?) ON CONFLICT (model) DO UPDATE SET "
                "input_per_1m_usd = excluded.input_per_1m_usd, "
                "output_per_1m_usd = excluded.output_per_1m_usd, updated_at = excluded.updated_at",
                price.model,
                price.input_per_1m_usd,
                price.output_per_1m_usd,
                self._t(now),
            )
            detail = price_change(old, price)
            await self._audit(tx, now, PRICES_AUDIT, None, "price.set", actor, detail)
            await self._announce(tx, now, Change(ChangeKind.PRICE, price.model))

        await self._write(work)
        return ModelPrice(price.model, price.input_per_1m_usd, price.output_per_1m_usd, now)

    async def _locked_workspace(self, tx: Tx, workspace_id: str) -> Workspace:
        row = await tx.fetchrow(
            f"SELECT {WORKSPACE_COLUMNS} FROM workspaces WHERE id = ?" + self.for_update,
            workspace_id,
        )
        if row is None:
            raise NotFound(f"no workspace {workspace_id}")
        return self._workspace(row)
