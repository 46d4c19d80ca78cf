"""The embedded store: one SQLite file shared by the server and the CLI (WAL mode).

Calls run on aiosqlite's worker thread, so the event loop never blocks on disk. There is no
LISTEN/NOTIFY, so writers append to a `changes` table in the same transaction and every
server polls it; a CLI revoke reaches a running sidecar within one poll interval.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiosqlite

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
from authz.store.base import (
    Change,
    ChangeKind,
    ChangeSink,
    Conflict,
    KeyLimitReached,
    NotFound,
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

_CHANGES_KEPT = timedelta(hours=1)


def _ts(value: datetime) -> str:
    # Fixed width, always UTC: text order equals time order, so SQL can compare them.
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_ts(value: Any) -> datetime:
    return datetime.fromisoformat(str(value))


def sqlite_path(url: str) -> str:
    """The file path in `sqlite:///PATH` (relative) or `sqlite:////abs/PATH`."""
    return url.removeprefix("sqlite:///")


class SqliteStore:
    """Store on a local SQLite file. Single machine only: use PostgreSQL past one machine."""

    def __init__(self, path: str, *, timeout_seconds: float, poll_seconds: float = 0.25) -> None:
        self._path = path
        self._timeout = timeout_seconds
        self._poll = poll_seconds
        self._conn: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        parent = Path(self._path).parent
        if not parent.exists():
            raise StoreUnavailable(f"database folder {parent} does not exist")
        try:
            conn = await aiosqlite.connect(self._path, isolation_level=None)
            conn.row_factory = sqlite3.Row
            await conn.execute("PRAGMA journal_mode=WAL")
            await conn.execute("PRAGMA busy_timeout=5000")
            await conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as error:
            raise StoreUnavailable(f"cannot open {self._path}: {error}") from error
        self._conn = conn

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    @property
    def _db(self) -> aiosqlite.Connection:
        if self._conn is None:
            raise StoreUnavailable("store is not open")
        return self._conn

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[aiosqlite.Connection]:
        """One IMMEDIATE transaction: writers from any process are serialized by SQLite."""
        async with self._lock:
            db = self._db
            try:
                await db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as error:
                raise StoreUnavailable(f"database is busy: {error}") from error
            try:
                yield db
            except BaseException:
                await db.execute("ROLLBACK")
                raise
            await db.execute("COMMIT")

    async def _fetchone(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Row | None:
        try:
            async with asyncio.timeout(self._timeout):
                cursor = await self._db.execute(sql, params)
                row = await cursor.fetchone()
                await cursor.close()
                return row
        except (TimeoutError, sqlite3.OperationalError) as error:
            raise StoreUnavailable(f"database read failed: {error or 'timed out'}") from error

    async def _fetchall(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        try:
            cursor = await self._db.execute(sql, params)
            rows = await cursor.fetchall()
            await cursor.close()
            return list(rows)
        except sqlite3.OperationalError as error:
            raise StoreUnavailable(f"database read failed: {error}") from error

    async def migrate(self) -> list[int]:
        applied: list[int] = []
        async with self._write() as db:
            await db.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
            )
            cursor = await db.execute("SELECT version FROM schema_migrations")
            done = {row[0] for row in await cursor.fetchall()}
            for migration in load_migrations("sqlite"):
                if migration.version in done:
                    continue
                # Our migration files hold no ';' inside statements, so splitting is safe;
                # executescript() would commit and break the surrounding transaction.
                for statement in migration.sql.split(";"):
                    if statement.strip() and not _only_comments(statement):
                        await db.execute(statement)
                await db.execute(
                    "INSERT INTO schema_migrations VALUES (?, ?, ?)",
                    (migration.version, migration.name, _ts(utc_now())),
                )
                applied.append(migration.version)
        return applied

    async def ping(self) -> None:
        await self._fetchone("SELECT 1")

    async def lookup_key(self, key_hash: bytes) -> tuple[KeyGrant, Workspace] | None:
        row = await self._fetchone(
            f"SELECT {LOOKUP_COLUMNS} FROM api_keys k JOIN workspaces w ON w.id = k.workspace_id "
            "WHERE k.key_hash = ? AND k.revoked_at IS NULL",
            (key_hash,),
        )
        if row is None:
            return None
        return grant_from_row(row, _parse_ts), workspace_from_row(row, _parse_ts, "ws_")

    async def get_workspace(self, workspace_id: str) -> Workspace | None:
        row = await self._fetchone(
            f"SELECT {WORKSPACE_COLUMNS} FROM workspaces WHERE id = ?", (workspace_id,)
        )
        return None if row is None else workspace_from_row(row, _parse_ts)

    async def list_workspaces(self) -> list[Workspace]:
        rows = await self._fetchall(
            f"SELECT {WORKSPACE_COLUMNS} FROM workspaces ORDER BY created_at"
        )
        return [workspace_from_row(row, _parse_ts) for row in rows]

    async def create_workspace(self, new: NewWorkspace, *, actor: Actor) -> Workspace:
        new = check_new_workspace(new)
        now = utc_now()
        workspace_id = new_workspace_id()
        async with self._write() as db:
            try:
                await db.execute(
                    f"INSERT INTO workspaces ({WORKSPACE_COLUMNS}) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        workspace_id,
                        new.name,
                        new.rpm,
                        new.tpm,
                        new.key_limit,
                        new.default_completion_tokens,
                        new.monthly_token_quota,
                        new.monthly_spend_cap_usd,
                        _ts(now),
                        _ts(now),
                    ),
                )
            except sqlite3.IntegrityError as error:
                raise Conflict(f"a workspace named {new.name!r} already exists") from error
            await self._audit(db, now, workspace_id, None, "workspace.create", actor, new.name)
        created = await self.get_workspace(workspace_id)
        assert created is not None
        return created

    async def update_workspace(
        self, workspace_id: str, update: WorkspaceUpdate, *, actor: Actor
    ) -> Workspace:
        now = utc_now()
        async with self._write() as db:
            cursor = await db.execute(
                f"SELECT {WORKSPACE_COLUMNS} FROM workspaces WHERE id = ?", (workspace_id,)
            )
            row = await cursor.fetchone()
            if row is None:
                raise NotFound(f"no workspace {workspace_id}")
            updated = apply_update(workspace_from_row(row, _parse_ts), update, updated_at=now)
            try:
                await db.execute(
                    "UPDATE workspaces SET name = ?, rpm = ?, tpm = ?, key_limit = ?, "
                    "default_completion_tokens = ?, monthly_token_quota = ?, "
                    "monthly_spend_cap_usd = ?, updated_at = ? WHERE id = ?",
                    (
                        updated.name,
                        updated.rpm,
                        updated.tpm,
                        updated.key_limit,
                        updated.default_completion_tokens,
                        updated.monthly_token_quota,
                        updated.monthly_spend_cap_usd,
                        _ts(now),
                        workspace_id,
                    ),
                )
            except sqlite3.IntegrityError as error:
                raise Conflict(f"a workspace named {updated.name!r} already exists") from error
            await self._audit(db, now, workspace_id, None, "workspace.update", actor, "")
            await self._notify(db, now, Change(ChangeKind.WORKSPACE, workspace_id))
        return updated

    async def create_key(self, new: NewKey, *, actor: Actor) -> ApiKey:
        label = check_label(new.label)
        now = utc_now()
        async with self._write() as db:
            cursor = await db.execute(
                "SELECT key_limit FROM workspaces WHERE id = ?", (new.workspace_id,)
            )
            row = await cursor.fetchone()
            if row is None:
                raise NotFound(f"no workspace {new.workspace_id}")
            cursor = await db.execute(
                "SELECT count(*) FROM api_keys WHERE workspace_id = ? AND revoked_at IS NULL "
                "AND (expires_at IS NULL OR expires_at > ?)",
                (new.workspace_id, _ts(now)),
            )
            active = await cursor.fetchone()
            assert active is not None
            if active[0] >= row[0]:
                raise KeyLimitReached()
            await db.execute(
                "INSERT INTO api_keys (id, workspace_id, label, key_hash, mask, created_at, "
                "expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    new.id,
                    new.workspace_id,
                    label,
                    new.key_hash,
                    new.mask,
                    _ts(now),
                    None if new.expires_at is None else _ts(new.expires_at),
                ),
            )
            await self._audit(db, now, new.workspace_id, new.id, "key.create", actor, label)
            # A hash could sit in a replica's negative cache only if someone guessed the key
            # before it existed; clear it anyway so "created" always means "works".
            await self._notify(db, now, Change(ChangeKind.KEY, new.key_hash.hex()))
        created = await self.get_key(new.id)
        assert created is not None
        return created

    async def get_key(self, key_id: str) -> ApiKey | None:
        row = await self._fetchone(f"SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?", (key_id,))
        return None if row is None else key_from_row(row, _parse_ts)

    async def get_key_by_hash(self, key_hash: bytes) -> ApiKey | None:
        row = await self._fetchone(
            f"SELECT {KEY_COLUMNS} FROM api_keys WHERE key_hash = ?", (key_hash,)
        )
        return None if row is None else key_from_row(row, _parse_ts)

    async def list_keys(self, workspace_id: str) -> list[ApiKey]:
        rows = await self._fetchall(
            f"SELECT {KEY_COLUMNS} FROM api_keys WHERE workspace_id = ? ORDER BY created_at, id",
            (workspace_id,),
        )
        return [key_from_row(row, _parse_ts) for row in rows]

    async def revoke_key(self, key_id: str, *, actor: Actor, reason: str = "revoked") -> ApiKey:
        now = utc_now()
        async with self._write() as db:
            cursor = await db.execute(
                "SELECT workspace_id, key_hash, revoked_at FROM api_keys WHERE id = ?", (key_id,)
            )
            row = await cursor.fetchone()
            if row is None:
                raise NotFound(f"no key {key_id}")
            if row["revoked_at"] is None:
                await db.execute(
                    "UPDATE api_keys SET revoked_at = ? WHERE id = ?", (_ts(now), key_id)
                )
                await self._audit(db, now, row["workspace_id"], key_id, "key.revoke", actor, reason)
            await self._notify(db, now, Change(ChangeKind.KEY, bytes(row["key_hash"]).hex()))
        revoked = await self.get_key(key_id)
        assert revoked is not None
        return revoked

    async def rotate_key(
        self, key_id: str, replacement: NewKey, *, actor: Actor, old_expires_at: datetime | None
    ) -> tuple[ApiKey, ApiKey]:
        label = check_label(replacement.label)
        now = utc_now()
        if old_expires_at is not None and old_expires_at <= now:
            raise InvalidInput("the grace deadline must be in the future")
        workspace_id = replacement.workspace_id
        async with self._write() as db:
            cursor = await db.execute(
                "SELECT key_limit FROM workspaces WHERE id = ?", (workspace_id,)
            )
            workspace = await cursor.fetchone()
            cursor = await db.execute(
                "SELECT key_hash, revoked_at, expires_at FROM api_keys "
                "WHERE id = ? AND workspace_id = ?",
                (key_id, workspace_id),
            )
            old = await cursor.fetchone()
            if workspace is None or old is None:
                raise NotFound(f"no key {key_id} in workspace {workspace_id}")
            deadline = None if old["expires_at"] is None else _parse_ts(old["expires_at"])
            if old["revoked_at"] is not None or (deadline is not None and deadline <= now):
                raise Conflict(f"key {key_id} is no longer active: create a new key instead")
            cursor = await db.execute(
                "SELECT count(*) FROM api_keys WHERE workspace_id = ? AND revoked_at IS NULL "
                "AND (expires_at IS NULL OR expires_at > ?)",
                (workspace_id, _ts(now)),
            )
            active = await cursor.fetchone()
            assert active is not None
            if active[0] - 1 >= workspace[0]:
                raise KeyLimitReached()
            await db.execute(
                "INSERT INTO api_keys (id, workspace_id, label, key_hash, mask, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    replacement.id,
                    workspace_id,
                    label,
                    replacement.key_hash,
                    replacement.mask,
                    _ts(now),
                ),
            )
            if old_expires_at is not None and (deadline is None or old_expires_at < deadline):
                deadline = old_expires_at
                await db.execute(
                    "UPDATE api_keys SET expires_at = ? WHERE id = ?", (_ts(deadline), key_id)
                )
            until = (
                "until revoked"
                if deadline is None
                else f"until {deadline.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}"
            )
            await self._audit(
                db,
                now,
                workspace_id,
                replacement.id,
                "key.create",
                actor,
                f"{label} (replaces {key_id})",
            )
            await self._audit(
                db,
                now,
                workspace_id,
                key_id,
                "key.rotate",
                actor,
                f"replaced by {replacement.id}; valid {until}",
            )
            await self._notify(db, now, Change(ChangeKind.KEY, bytes(old["key_hash"]).hex()))
            await self._notify(db, now, Change(ChangeKind.KEY, replacement.key_hash.hex()))
        previous, created = await self.get_key(key_id), await self.get_key(replacement.id)
        assert previous is not None
        assert created is not None
        return previous, created

    async def record_key_use(self, last_used: Mapping[str, datetime]) -> None:
        if not last_used:
            return
        params = [(_ts(at), key_id, _ts(at)) for key_id, at in last_used.items()]
        async with self._write() as db:
            await db.executemany(
                "UPDATE api_keys SET last_used_at = ? WHERE id = ? "
                "AND (last_used_at IS NULL OR last_used_at < ?)",
                params,
            )

    async def list_audit(self, workspace_id: str) -> list[AuditEntry]:
        rows = await self._fetchall(
            f"SELECT {AUDIT_COLUMNS} FROM audit_log WHERE workspace_id = ? ORDER BY id",
            (workspace_id,),
        )
        return [audit_from_row(row, _parse_ts) for row in rows]

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
            encode_time=_ts,
            placeholder=lambda _n: "?",
        )
        rows = await self._fetchall(
            f"SELECT {USAGE_COLUMNS} FROM usage_hourly{where} "
            "ORDER BY hour, workspace_id, key_id, model",
            tuple(params),
        )
        return [usage_from_row(row, _parse_ts) for row in rows]

    async def apply_usage_batch(self, batch_id: str, rows: Sequence[UsageRow]) -> bool:
        now = utc_now()
        async with self._write() as db:
            cursor = await db.execute(
                "INSERT INTO usage_batches (batch_id, applied_at) VALUES (?, ?) "
                "ON CONFLICT (batch_id) DO NOTHING",
                (batch_id, _ts(now)),
            )
            if cursor.rowcount == 0:
                return False
            await db.executemany(
                f"INSERT INTO usage_hourly ({USAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                + USAGE_UPSERT,
                [usage_values(r, _ts) for r in rows],
            )
        return True

    async def period_totals(
        self, workspace_id: str, since: datetime, until: datetime
    ) -> tuple[int, float]:
        row = await self._fetchone(
            "SELECT coalesce(sum(prompt_tokens + completion_tokens), 0), "
            "coalesce(sum(spend_usd), 0) FROM usage_hourly "
            "WHERE workspace_id = ? AND hour >= ? AND hour < ?",
            (workspace_id, _ts(since), _ts(until)),
        )
        assert row is not None
        return int(row[0]), float(row[1])

    async def list_prices(self) -> list[ModelPrice]:
        rows = await self._fetchall(
            "SELECT model, input_per_1m_usd, output_per_1m_usd, updated_at FROM model_prices "
            "ORDER BY model"
        )
        return [price_from_row(row, _parse_ts) for row in rows]

    async def set_price(self, price: ModelPrice, *, actor: Actor) -> ModelPrice:
        price = check_price(price)
        now = utc_now()
        async with self._write() as db:
            await db.execute(
                "INSERT INTO model_prices VALUES (?, ?, ?, ?) ON CONFLICT (model) DO UPDATE SET "
                "input_per_1m_usd = excluded.input_per_1m_usd, "
                "output_per_1m_usd = excluded.output_per_1m_usd, updated_at = excluded.updated_at",
                (price.model, price.input_per_1m_usd, price.output_per_1m_usd, _ts(now)),
            )
            await self._notify(db, now, Change(ChangeKind.PRICE, price.model))
        return ModelPrice(price.model, price.input_per_1m_usd, price.output_per_1m_usd, now)

    async def watch_changes(self, sink: ChangeSink) -> None:
        row = await self._fetchone("SELECT coalesce(max(seq), 0) FROM changes")
        last_seq = 0 if row is None else int(row[0])
        # As after a PostgreSQL LISTEN: from here on nothing is missed, before it might be.
        sink.on_reset()
        healthy = True
        while True:
            await asyncio.sleep(self._poll)
            try:
                rows = await self._fetchall(
                    "SELECT seq, payload FROM changes WHERE seq > ? ORDER BY seq", (last_seq,)
                )
            except StoreUnavailable as error:
                if healthy:
                    log.warning("change feed: cannot read changes: %s", error)
                healthy = False
                continue
            if not healthy:
                sink.on_reset()
                healthy = True
            for row in rows:
                last_seq = row["seq"]
                change = Change.decode(row["payload"])
                if change is not None:
                    sink.on_change(change)

    async def _notify(self, db: aiosqlite.Connection, now: datetime, change: Change) -> None:
        await db.execute(
            "INSERT INTO changes (payload, at) VALUES (?, ?)", (change.encode(), _ts(now))
        )
        await db.execute("DELETE FROM changes WHERE at < ?", (_ts(now - _CHANGES_KEPT),))

    async def _audit(
        self,
        db: aiosqlite.Connection,
        now: datetime,
        workspace_id: str,
        key_id: str | None,
        action: str,
        actor: Actor,
        detail: str,
    ) -> None:
        await db.execute(
            f"INSERT INTO audit_log ({AUDIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                _ts(now),
                workspace_id,
                key_id,
                action,
                actor.kind,
                actor.subject,
                actor.issuer,
                actor.address,
                detail,
            ),
        )


def _only_comments(statement: str) -> bool:
    return all(not line.strip() or line.strip().startswith("--") for line in statement.splitlines())
