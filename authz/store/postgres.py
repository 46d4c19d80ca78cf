"""PostgreSQL store on an asyncpg pool: many stateless replicas share it.

Every call is bounded by a timeout; connection-level failures become StoreUnavailable so the
Check path can answer UNAVAILABLE (never a false 401). Revocations and limit changes are
broadcast with NOTIFY in the writing transaction; every replica LISTENs on a dedicated
connection, and drops its whole cache after any reconnect because NOTIFY has no replay.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime
from typing import Any

import asyncpg

from authz.keys import new_workspace_id
from authz.migrations import load_migrations
from authz.models import (
    Actor,
    ApiKey,
    AuditEntry,
    KeyGrant,
    ModelPrice,
    NewKey,
    NewWorkspace,
    UsageRow,
    Workspace,
    WorkspaceUpdate,
)
from authz.settings import redact_url
from authz.store.base import (
    CHANGE_CHANNEL,
    Change,
    ChangeKind,
    ChangeSink,
    Conflict,
    KeyLimitReached,
    NotFound,
    SchemaMissing,
    StoreUnavailable,
    utc_now,
)
from authz.store.common import (
    USAGE_COLUMNS,
    USAGE_UPSERT,
    InvalidInput,
    apply_update,
    check_label,
    check_new_workspace,
    check_price,
    usage_filters,
    usage_values,
)
from authz.store.rows import (
    AUDIT_COLUMNS,
    KEY_COLUMNS,
    LOOKUP_COLUMNS,
    WORKSPACE_COLUMNS,
    audit_from_row,
    grant_from_row,
    key_from_row,
    price_from_row,
    usage_from_row,
    workspace_from_row,
)

log = logging.getLogger(__name__)

Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy

UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.InterfaceError,
)
_MIGRATION_LOCK = 0x6F616973  # any constant; serializes concurrent `authz migrate` runs
_WRITE_TIMEOUT = 10.0
_FEED_PROBE_SECONDS = 1.0
_FEED_MAX_BACKOFF = 2.0


def _same(value: Any) -> datetime:
    return value  # type: ignore[no-any-return]


class PostgresStore:
    """Store on PostgreSQL. Reads on the request path are bounded by `timeout_seconds`."""

    def __init__(self, dsn: str, *, timeout_seconds: float, pool_size: int = 10) -> None:
        self._dsn = dsn
        self._timeout = timeout_seconds
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._latest_version = load_migrations("postgres")[-1].version

    async def open(self) -> None:
        """Create the pool without connecting: readiness, not start-up, reports an outage."""
        self._pool = await asyncpg.create_pool(
            self._dsn,
            min_size=0,
            max_size=self._pool_size,
            timeout=max(self._timeout, 2.0),
            max_inactive_connection_lifetime=60.0,
        )

    async def close(self) -> None:
        if self._pool is not None:
            with suppress(*UNAVAILABLE_ERRORS):
                await asyncio.wait_for(self._pool.close(), timeout=2.0)
            self._pool.terminate()
            self._pool = None

    @property
    def _p(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreUnavailable("store is not open")
        return self._pool

    @asynccontextmanager
    async def _conn(self, seconds: float) -> AsyncIterator[Conn]:
        try:
            async with asyncio.timeout(seconds), self._p.acquire() as conn:
                yield conn
        except (asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError) as error:
            raise SchemaMissing(
                f"the database schema is missing or out of date ({error}): run `authz migrate`"
            ) from error
        except UNAVAILABLE_ERRORS as error:
            detail = str(error) or type(error).__name__
            raise StoreUnavailable(
                f"PostgreSQL at {redact_url(self._dsn)} unavailable: {detail}"
            ) from error

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[Conn]:
        async with self._conn(_WRITE_TIMEOUT) as conn, conn.transaction():
            yield conn

    async def migrate(self) -> list[int]:
        applied: list[int] = []
        async with self._tx() as conn:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, "
                "name text NOT NULL, applied_at timestamptz NOT NULL)"
            )
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for migration in load_migrations("postgres"):
                if migration.version in done:
                    continue
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    utc_now(),
                )
                applied.append(migration.version)
        return applied

    async def ping(self) -> None:
        """Reachable and migrated: a replica without the schema cannot authorize."""
        async with self._conn(self._timeout) as conn:
            version = await conn.fetchval("SELECT max(version) FROM schema_migrations")
        latest = self._latest_version
        if version is None or version < latest:
            raise SchemaMissing(
                f"the database schema is at version {version}, {latest} is needed: "
                "run `authz migrate`"
            )

    async def lookup_key(self, key_hash: bytes) -> tuple[KeyGrant, Workspace] | None:
        async with self._conn(self._timeout) as conn:
            row = await conn.fetchrow(
                f"SELECT {LOOKUP_COLUMNS} FROM api_keys k "
                "JOIN workspaces w ON w.id = k.workspace_id "
                "WHERE k.key_hash = $1 AND k.revoked_at IS NULL",
                key_hash,
            )
        if row is None:
            return None
        return grant_from_row(row, _same), workspace_from_row(row, _same, "ws_")

    async def get_workspace(self, workspace_id: str) -> Workspace | None:
        async with self._conn(self._timeout) as conn:
            row = await conn.fetchrow(
                f"SELECT {WORKSPACE_COLUMNS} FROM workspaces WHERE id = $1", workspace_id
            )
        return None if row is None else workspace_from_row(row, _same)

    async def list_workspaces(self) -> list[Workspace]:
        async with self._conn(_WRITE_TIMEOUT) as conn:
            rows = await conn.fetch(
                f"SELECT {WORKSPACE_COLUMNS} FROM workspaces ORDER BY created_at"
            )
        return [workspace_from_row(row, _same) for row in rows]

    async def create_workspace(self, new: NewWorkspace, *, actor: Actor) -> Workspace:
        new = check_new_workspace(new)
        now = utc_now()
        try:
            async with self._tx() as conn:
                row = await conn.fetchrow(
                    f"INSERT INTO workspaces ({WORKSPACE_COLUMNS}) "
                    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9) "
                    f"RETURNING {WORKSPACE_COLUMNS}",
                    new_workspace_id(),
                    new.name,
                    new.rpm,
                    new.tpm,
                    new.key_limit,
                    new.default_completion_tokens,
                    new.monthly_token_quota,
                    new.monthly_spend_cap_usd,
                    now,
                )
                assert row is not None
                await _audit(conn, now, row["id"], None, "workspace.create", actor, new.name)
        except asyncpg.UniqueViolationError as error:
            raise Conflict(f"a workspace named {new.name!r} already exists") from error
        return workspace_from_row(row, _same)

    async def update_workspace(
        self, workspace_id: str, update: WorkspaceUpdate, *, actor: Actor
    ) -> Workspace:
        now = utc_now()
        try:
            async with self._tx() as conn:
                row = await conn.fetchrow(
                    f"SELECT {WORKSPACE_COLUMNS} FROM workspaces WHERE id = $1 FOR UPDATE",
                    workspace_id,
                )
                if row is None:
                    raise NotFound(f"no workspace {workspace_id}")
                updated = apply_update(workspace_from_row(row, _same), update, updated_at=now)
                await conn.execute(
                    "UPDATE workspaces SET name = $2, rpm = $3, tpm = $4, key_limit = $5, "
                    "default_completion_tokens = $6, monthly_token_quota = $7, "
                    "monthly_spend_cap_usd = $8, updated_at = $9 WHERE id = $1",
                    workspace_id,
                    updated.name,
                    updated.rpm,
                    updated.tpm,
                    updated.key_limit,
                    updated.default_completion_tokens,
                    updated.monthly_token_quota,
                    updated.monthly_spend_cap_usd,
                    now,
                )
                await _audit(conn, now, workspace_id, None, "workspace.update", actor, "")
                await _notify(conn, Change(ChangeKind.WORKSPACE, workspace_id))
        except asyncpg.UniqueViolationError as error:
            raise Conflict(f"a workspace named {update.name!r} already exists") from error
        return updated

    async def create_key(self, new: NewKey, *, actor: Actor) -> ApiKey:
        label = check_label(new.label)
        now = utc_now()
        async with self._tx() as conn:
            # The row lock serializes creates per workspace, so the limit holds under races.
            limit = await conn.fetchval(
                "SELECT key_limit FROM workspaces WHERE id = $1 FOR UPDATE", new.workspace_id
            )
            if limit is None:
                raise NotFound(f"no workspace {new.workspace_id}")
            active = await conn.fetchval(
                "SELECT count(*) FROM api_keys WHERE workspace_id = $1 AND revoked_at IS NULL "
                "AND (expires_at IS NULL OR expires_at > $2)",
                new.workspace_id,
                now,
            )
            if active >= limit:
                raise KeyLimitReached()
            row = await conn.fetchrow(
                "INSERT INTO api_keys (id, workspace_id, label, key_hash, mask, created_at, "
                f"expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {KEY_COLUMNS}",
                new.id,
                new.workspace_id,
                label,
                new.key_hash,
                new.mask,
                now,
                new.expires_at,
            )
            assert row is not None
            await _audit(conn, now, new.workspace_id, new.id, "key.create", actor, label)
            await _notify(conn, Change(ChangeKind.KEY, new.key_hash.hex()))
        return key_from_row(row, _same)

    async def get_key(self, key_id: str) -> ApiKey | None:
        async with self._conn(_WRITE_TIMEOUT) as conn:
            row = await conn.fetchrow(f"SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1", key_id)
        return None if row is None else key_from_row(row, _same)

    async def get_key_by_hash(self, key_hash: bytes) -> ApiKey | None:
        async with self._conn(_WRITE_TIMEOUT) as conn:
            row = await conn.fetchrow(
                f"SELECT {KEY_COLUMNS} FROM api_keys WHERE key_hash = $1", key_hash
            )
        return None if row is None else key_from_row(row, _same)

    async def list_keys(self, workspace_id: str) -> list[ApiKey]:
        async with self._conn(_WRITE_TIMEOUT) as conn:
            rows = await conn.fetch(
                f"SELECT {KEY_COLUMNS} FROM api_keys WHERE workspace_id = $1 "
                "ORDER BY created_at, id",
                workspace_id,
            )
        return [key_from_row(row, _same) for row in rows]

    async def revoke_key(self, key_id: str, *, actor: Actor, reason: str = "revoked") -> ApiKey:
        now = utc_now()
        async with self._tx() as conn:
            row = await conn.fetchrow(
                "SELECT workspace_id, key_hash, revoked_at FROM api_keys WHERE id = $1 FOR UPDATE",
                key_id,
            )
            if row is None:
                raise NotFound(f"no key {key_id}")
            if row["revoked_at"] is None:
                await conn.execute("UPDATE api_keys SET revoked_at = $2 WHERE id = $1", key_id, now)
                await _audit(conn, now, row["workspace_id"], key_id, "key.revoke", actor, reason)
            await _notify(conn, Change(ChangeKind.KEY, bytes(row["key_hash"]).hex()))
            revoked = await conn.fetchrow(
                f"SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1", key_id
            )
        assert revoked is not None
        return key_from_row(revoked, _same)

    async def rotate_key(
        self, key_id: str, replacement: NewKey, *, actor: Actor, old_expires_at: datetime | None
    ) -> tuple[ApiKey, ApiKey]:
        label = check_label(replacement.label)
        now = utc_now()
        if old_expires_at is not None and old_expires_at <= now:
            raise InvalidInput("the grace deadline must be in the future")
        workspace_id = replacement.workspace_id
        async with self._tx() as conn:
            # The workspace row lock serializes rotations with creates, as in create_key.
            limit = await conn.fetchval(
                "SELECT key_limit FROM workspaces WHERE id = $1 FOR UPDATE", workspace_id
            )
            old = await conn.fetchrow(
                "SELECT key_hash, revoked_at, expires_at FROM api_keys "
                "WHERE id = $1 AND workspace_id = $2 FOR UPDATE",
                key_id,
                workspace_id,
            )
            if limit is None or old is None:
                raise NotFound(f"no key {key_id} in workspace {workspace_id}")
            deadline: datetime | None = old["expires_at"]
            if old["revoked_at"] is not None or (deadline is not None and deadline <= now):
                raise Conflict(f"key {key_id} is no longer active: create a new key instead")
            active = await conn.fetchval(
                "SELECT count(*) FROM api_keys WHERE workspace_id = $1 AND revoked_at IS NULL "
                "AND (expires_at IS NULL OR expires_at > $2)",
                workspace_id,
                now,
            )
            if active - 1 >= limit:
                raise KeyLimitReached()
            await conn.execute(
                "INSERT INTO api_keys (id, workspace_id, label, key_hash, mask, created_at) "
                "VALUES ($1, $2, $3, $4, $5, $6)",
                replacement.id,
                workspace_id,
                label,
                replacement.key_hash,
                replacement.mask,
                now,
            )
            if old_expires_at is not None and (deadline is None or old_expires_at < deadline):
                deadline = old_expires_at
                await conn.execute(
                    "UPDATE api_keys SET expires_at = $2 WHERE id = $1", key_id, deadline
                )
            until = (
                "until revoked"
                if deadline is None
                else f"until {deadline.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}"
            )
            await _audit(
                conn,
                now,
                workspace_id,
                replacement.id,
                "key.create",
                actor,
                f"{label} (replaces {key_id})",
            )
            await _audit(
                conn,
                now,
                workspace_id,
                key_id,
                "key.rotate",
                actor,
                f"replaced by {replacement.id}; valid {until}",
            )
            await _notify(conn, Change(ChangeKind.KEY, bytes(old["key_hash"]).hex()))
            await _notify(conn, Change(ChangeKind.KEY, replacement.key_hash.hex()))
            rows = await conn.fetch(
                f"SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ANY($1::text[])",
                [key_id, replacement.id],
            )
        by_id = {row["id"]: key_from_row(row, _same) for row in rows}
        return by_id[key_id], by_id[replacement.id]

    async def record_key_use(self, last_used: Mapping[str, datetime]) -> None:
        if not last_used:
            return
        async with self._conn(_WRITE_TIMEOUT) as conn:
            await conn.execute(
                "UPDATE api_keys AS k SET last_used_at = u.at "
                "FROM unnest($1::text[], $2::timestamptz[]) AS u(id, at) "
                "WHERE k.id = u.id AND (k.last_used_at IS NULL OR k.last_used_at < u.at)",
                list(last_used.keys()),
                list(last_used.values()),
            )

    async def list_audit(self, workspace_id: str) -> list[AuditEntry]:
        async with self._conn(_WRITE_TIMEOUT) as conn:
            rows = await conn.fetch(
                f"SELECT {AUDIT_COLUMNS} FROM audit_log WHERE workspace_id = $1 ORDER BY id",
                workspace_id,
            )
        return [audit_from_row(row, _same) for row in rows]

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
            since=since,
            until=until,
            encode_time=_same,
            placeholder=lambda n: f"${n}",
        )
        async with self._conn(_WRITE_TIMEOUT) as conn:
            rows = await conn.fetch(
                f"SELECT {USAGE_COLUMNS} FROM usage_hourly{where} "
                "ORDER BY hour, workspace_id, key_id, model",
                *params,
            )
        return [usage_from_row(row, _same) for row in rows]

    async def apply_usage_batch(self, batch_id: str, rows: Sequence[UsageRow]) -> bool:
        async with self._tx() as conn:
            inserted = await conn.fetchval(
                "INSERT INTO usage_batches (batch_id, applied_at) VALUES ($1, $2) "
                "ON CONFLICT (batch_id) DO NOTHING RETURNING true",
                batch_id,
                utc_now(),
            )
            if not inserted:
                return False
            await conn.executemany(
                f"INSERT INTO usage_hourly ({USAGE_COLUMNS}) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) " + USAGE_UPSERT,
                [usage_values(r, _same) for r in rows],
            )
        return True

    async def period_totals(
        self, workspace_id: str, since: datetime, until: datetime
    ) -> tuple[int, float]:
        async with self._conn(_WRITE_TIMEOUT) as conn:
            row = await conn.fetchrow(
                "SELECT coalesce(sum(prompt_tokens + completion_tokens), 0) AS tokens, "
                "coalesce(sum(spend_usd), 0) AS spend FROM usage_hourly "
                "WHERE workspace_id = $1 AND hour >= $2 AND hour < $3",
                workspace_id,
                since,
                until,
            )
        assert row is not None
        return int(row["tokens"]), float(row["spend"])

    async def list_prices(self) -> list[ModelPrice]:
        async with self._conn(_WRITE_TIMEOUT) as conn:
            rows = await conn.fetch(
                "SELECT model, input_per_1m_usd, output_per_1m_usd, updated_at "
                "FROM model_prices ORDER BY model"
            )
        return [price_from_row(row, _same) for row in rows]

    async def set_price(self, price: ModelPrice, *, actor: Actor) -> ModelPrice:
        price = check_price(price)
        now = utc_now()
        async with self._tx() as conn:
            await conn.execute(
                "INSERT INTO model_prices VALUES ($1, $2, $3, $4) ON CONFLICT (model) DO UPDATE "
                "SET input_per_1m_usd = excluded.input_per_1m_usd, "
                "output_per_1m_usd = excluded.output_per_1m_usd, updated_at = excluded.updated_at",
                price.model,
                price.input_per_1m_usd,
                price.output_per_1m_usd,
                now,
            )
            await _notify(conn, Change(ChangeKind.PRICE, price.model))
        return ModelPrice(price.model, price.input_per_1m_usd, price.output_per_1m_usd, now)

    async def watch_changes(self, sink: ChangeSink) -> None:
        backoff = 0.05
        warned = False
        while True:
            try:
                conn = await asyncpg.connect(self._dsn, timeout=2.0)
            except UNAVAILABLE_ERRORS as error:
                if not warned:
                    log.warning("change feed: cannot connect to PostgreSQL: %s", error)
                    warned = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _FEED_MAX_BACKOFF)
                continue
            try:
                await self._listen(conn, sink)
            except UNAVAILABLE_ERRORS as error:
                log.warning("change feed: lost the LISTEN connection: %s", error or "closed")
            finally:
                conn.terminate()
            warned = False
            backoff = 0.05

    async def _listen(self, conn: asyncpg.Connection, sink: ChangeSink) -> None:
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())

        def deliver(_conn: object, _pid: int, _channel: str, payload: object) -> None:
            change = Change.decode(str(payload))
            if change is not None:
                sink.on_change(change)

        await conn.add_listener(CHANGE_CHANNEL, deliver)
        # Whatever changed while we were not listening is lost: start from an empty cache.
        sink.on_reset()
        log.info("change feed: listening on %s", CHANGE_CHANNEL)
        while not lost.is_set():
            with suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), timeout=_FEED_PROBE_SECONDS)
            if not lost.is_set():
                # A silently dead network never terminates the connection: probe it.
                await conn.fetchval("SELECT 1", timeout=_FEED_PROBE_SECONDS)
        raise ConnectionError("connection terminated")


async def _notify(conn: Conn, change: Change) -> None:
    await conn.execute("SELECT pg_notify($1, $2)", CHANGE_CHANNEL, change.encode())


async def _audit(
    conn: Conn,
    now: datetime,
    workspace_id: str,
    key_id: str | None,
    action: str,
    actor: Actor,
    detail: str,
) -> None:
    await conn.execute(
        f"INSERT INTO audit_log ({AUDIT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        now,
        workspace_id,
        key_id,
        action,
        actor.kind,
        actor.subject,
        actor.issuer,
        actor.address,
        detail,
    )
