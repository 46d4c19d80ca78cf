"""SQLite dialect: one file shared by the server and the CLI (WAL mode).

Calls run on aiosqlite's worker thread, so the event loop never blocks on disk. There is no
LISTEN/NOTIFY, so writers append to a `changes` table in the same transaction and every
server polls it; a CLI revoke reaches a running sidecar within one poll interval.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiosqlite

from authz.store.base import Change, ChangeSink, StoreUnavailable
from authz.store.dialect import Failure, Retry, Timeouts, Tx, opened
from authz.store.rows import Row
from authz.store.sql import SqlStore

log = logging.getLogger(__name__)

_CHANGES_KEPT = timedelta(hours=1)


def sqlite_path(url: str) -> str:
    """The file path in `sqlite:///PATH` (relative) or `sqlite:////abs/PATH`."""
    return url.removeprefix("sqlite:///")


class _SqliteTx:
    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    async def execute(self, sql: str, *args: Any) -> int:
        cursor = await self._db.execute(sql, args)
        changed = cursor.rowcount
        await cursor.close()
        return max(changed, 0)

    async def executemany(self, sql: str, args: Sequence[Sequence[Any]]) -> None:
        await self._db.executemany(sql, args)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        cursor = await self._db.execute(sql, args)
        rows = await cursor.fetchall()
        await cursor.close()
        return list(rows)

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        cursor = await self._db.execute(sql, args)
        row: Row | None = await cursor.fetchone()
        await cursor.close()
        return row


class SqliteStore(SqlStore):
    """Store on a local SQLite file. Single machine only: use PostgreSQL past one machine."""

    name = "sqlite"
    # BEGIN IMMEDIATE takes the database's write lock: writers are serialized already.
    for_update = ""
    time_type = "TEXT"

    def __init__(
        self,
        path: str,
        *,
        timeouts: Timeouts,
        poll_seconds: float = 0.25,
    ) -> None:
        super().__init__(timeouts=timeouts)
        self._path = path
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

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Tx]:
        yield _SqliteTx(opened(self._conn))

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Tx]:
        """One IMMEDIATE transaction: writers from any process are serialized by SQLite."""
        async with self._lock:
            db = opened(self._conn)
            await _begin(db)
            try:
                yield _SqliteTx(db)
            except BaseException:
                await db.execute("ROLLBACK")
                raise
            await db.execute("COMMIT")

    def _classify(self, error: Exception) -> Failure | None:
        if isinstance(error, sqlite3.IntegrityError):
            return Failure.conflict(error)
        if isinstance(error, sqlite3.OperationalError) and "no such table" in str(error):
            return Failure.schema_missing(error)
        if isinstance(error, sqlite3.DatabaseError):
            return Failure.unavailable(self._describe(), error, Retry.NEVER)
        return None

    def _describe(self) -> str:
        return f"database {self._path}"

    def _t(self, value: datetime) -> Any:
        # Fixed width, always UTC: text order equals time order, so SQL can compare them.
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def _parse_time(self, value: Any) -> datetime:
        return datetime.fromisoformat(str(value))

    async def _announce(self, tx: Tx, now: datetime, change: Change) -> None:
        await tx.execute(
            "INSERT INTO changes (payload, at) VALUES (?, ?)", change.encode(), self._t(now)
        )
        await tx.execute("DELETE FROM changes WHERE at < ?", self._t(now - _CHANGES_KEPT))

    async def _lock_migrations(self, tx: Tx) -> None:
        """BEGIN IMMEDIATE already holds the only write lock."""

    async def _run_script(self, tx: Tx, sql: str) -> None:
        # Our migration files hold no ';' inside statements, so splitting is safe;
        # executescript() would commit and break the surrounding transaction.
        for statement in sql.split(";"):
            if statement.strip() and not _only_comments(statement):
                await tx.execute(statement)

    async def watch_changes(self, sink: ChangeSink) -> None:
        row = await self._read(
            lambda tx: tx.fetchrow("SELECT coalesce(max(seq), 0) AS seq FROM changes")
        )
        last_seq = 0 if row is None else int(row["seq"])
        # As after a PostgreSQL LISTEN: from here on nothing is missed, before it might be.
        sink.on_reset()
        healthy = True
        while True:
            await asyncio.sleep(self._poll)
            try:
                rows = await self._changes_after(last_seq)
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

    async def _changes_after(self, seq: int) -> list[Row]:
        return await self._read(
            lambda tx: tx.fetch("SELECT seq, payload FROM changes WHERE seq > ? ORDER BY seq", seq)
        )


def _only_comments(statement: str) -> bool:
    return all(not line.strip() or line.strip().startswith("--") for line in statement.splitlines())


async def _begin(db: aiosqlite.Connection) -> None:
    """BEGIN IMMEDIATE, first rolling back a transaction its caller abandoned.

    aiosqlite runs statements on its thread in order, whatever happens to the coroutine that
    sent them: a caller cancelled (a timeout) while awaiting its BEGIN leaves that BEGIN to
    run anyway, and the connection in a transaction nobody will end. Its caller saw an error
    and will retry, so its work is rolled back here instead of failing every later
    transaction with "cannot start a transaction within a transaction".
    """
    try:
        await db.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as error:
        if "within a transaction" not in str(error):
            raise
        log.info("sqlite: rolled back a transaction abandoned by a cancelled caller")
        await db.execute("ROLLBACK")
        await db.execute("BEGIN IMMEDIATE")
