"""PostgreSQL dialect on an asyncpg pool: many stateless replicas share one database.

Revocations and limit changes are broadcast with NOTIFY in the writing transaction; the change
feed LISTENs on one dedicated connection per process (a direct URL of its own, because LISTEN
does not work through PgBouncer in transaction mode) and drops the whole cache after any
reconnect, because NOTIFY has no replay.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from datetime import datetime
from functools import lru_cache
from typing import Any, Protocol

import asyncpg

from authz.store.base import CHANGE_CHANNEL, Change, ChangeSink
from authz.store.dialect import Failure, Retry, Timeouts, Tx, opened
from authz.store.rows import Row
from authz.store.sql import SqlStore
from authz.urls import redact_url

log = logging.getLogger(__name__)

Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy

CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
)
"""The connection or the server failed: the database may answer on another connection."""
FEED_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, asyncpg.PostgresError)
"""Any of these on the LISTEN session means it is gone: listen again on a new one."""
ROLLED_BACK_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
)
"""The server aborted the transaction to resolve a clash with another one: run it again."""
_MIGRATION_LOCK = 0x6F616973  # any constant; serializes concurrent `authz migrate` runs
_FEED_PROBE_SECONDS = 1.0
_FEED_MAX_BACKOFF = 2.0
_PLACEHOLDER = re.compile(r"\?")


@lru_cache(maxsize=256)
def numbered(sql: str) -> str:
    """`?` placeholders as PostgreSQL's `$1, $2, ...` (our statements hold no literal `?`)."""
    count = 0

    def number(_match: re.Match[str]) -> str:
        nonlocal count
        count += 1
        return f"${count}"

    return _PLACEHOLDER.sub(number, sql)


class PoolObserver(Protocol):
    """Told how the pool is used, for metrics and readiness (the store knows neither)."""

    def sized(self, connections: int) -> None:
        """The pool holds at most `connections` (AUTHZ_DB_POOL_SIZE)."""

    def used(self, *, in_use: int, waiting: int) -> None:
        """Connections lent out and acquires waiting for one, after each change."""

    def waited(self, *, acquired: bool) -> None:
        """An acquire found every connection lent out: it got one in time, or gave up."""


class _Unobserved:
    def sized(self, connections: int) -> None:
        pass

    def used(self, *, in_use: int, waiting: int) -> None:
        pass

    def waited(self, *, acquired: bool) -> None:
        pass


class _PgTx:
    def __init__(self, conn: Conn) -> None:
        self._conn = conn

    async def execute(self, sql: str, *args: Any) -> int:
        status: str = await self._conn.execute(numbered(sql), *args)
        # "INSERT 0 1", "UPDATE 3", "SELECT 1": the last word counts the rows.
        last = status.rpartition(" ")[2]
        return int(last) if last.isdigit() else 0

    async def executemany(self, sql: str, args: Sequence[Sequence[Any]]) -> None:
        await self._conn.executemany(numbered(sql), args)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return list(await self._conn.fetch(numbered(sql), *args))

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        row: Row | None = await self._conn.fetchrow(numbered(sql), *args)
        return row


class PostgresStore(SqlStore):
    """Store on PostgreSQL. Every call, pool acquire included, runs within its timeout."""

    name = "postgres"
    for_update = " FOR UPDATE"
    time_type = "timestamptz"

    def __init__(
        self,
        dsn: str,
        *,
        timeouts: Timeouts,
        pool_size: int = 2,
        listen_dsn: str | None = None,
        statement_cache: bool = True,
        observer: PoolObserver | None = None,
    ) -> None:
        super().__init__(timeouts=timeouts)
        self._dsn = dsn
        self._listen_dsn = listen_dsn or dsn
        self._pool_size = pool_size
        self._statement_cache = statement_cache
        self._pool: asyncpg.Pool | None = None
        self._observer = observer or _Unobserved()
        self._in_use = 0
        self._waiting = 0

    async def open(self) -> None:
        """Create the pool without connecting: readiness, not start-up, reports an outage."""
        self._pool = await asyncpg.create_pool(
            self._dsn,
            min_size=0,
            max_size=self._pool_size,
            timeout=max(self._read_timeout, 2.0),
            max_inactive_connection_lifetime=60.0,
            # PgBouncer in transaction mode hands each transaction any server connection, so
            # a statement prepared on one is unknown on the next: no cache there.
            statement_cache_size=100 if self._statement_cache else 0,
        )
        self._observer.sized(self._pool_size)

    async def close(self) -> None:
        if self._pool is not None:
            with suppress(*CONNECTION_ERRORS):
                async with asyncio.timeout(2.0):  # not wait_for: it can lose a cancel on 3.11
                    await self._pool.close()
            self._pool.terminate()
            self._pool = None

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Tx]:
        async with self._acquire() as conn:
            yield _PgTx(conn)

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Tx]:
        async with self._acquire() as conn, conn.transaction():
            yield _PgTx(conn)

    @asynccontextmanager
    async def _acquire(self) -> AsyncIterator[Conn]:
        """A pooled connection, with the pool's use reported to the observer.

        Counted here rather than read from asyncpg's internals: an acquire waits exactly when
        every connection is lent out or already promised to an earlier waiter.
        """
        pool = opened(self._pool)
        must_wait = self._in_use + self._waiting >= self._pool_size
        self._waiting += 1
        self._observer.used(in_use=self._in_use, waiting=self._waiting)
        lent = False
        try:
            async with pool.acquire() as conn:
                lent = True
                self._waiting -= 1
                self._in_use += 1
                self._observer.used(in_use=self._in_use, waiting=self._waiting)
                if must_wait:
                    self._observer.waited(acquired=True)
                try:
                    yield conn
                finally:
                    self._in_use -= 1
        except asyncio.CancelledError:
            # The call's deadline ran out (see Dialect._run) while it waited for a connection.
            if not lent and must_wait:
                self._observer.waited(acquired=False)
            raise
        finally:
            if not lent:
                self._waiting -= 1
            self._observer.used(in_use=self._in_use, waiting=self._waiting)

    def _classify(self, error: Exception) -> Failure | None:
        if isinstance(error, asyncpg.UndefinedTableError | asyncpg.UndefinedColumnError):
            return Failure.schema_missing(error)
        if isinstance(error, asyncpg.UniqueViolationError):
            return Failure.conflict(error)
        if isinstance(error, ROLLED_BACK_ERRORS):
            return Failure.unavailable(self._describe(), error, Retry.ROLLED_BACK)
        if isinstance(error, CONNECTION_ERRORS):
            return Failure.unavailable(self._describe(), error, Retry.CONNECTION)
        return None

    def _describe(self) -> str:
        return f"PostgreSQL at {redact_url(self._dsn)}"

    def _t(self, value: datetime) -> Any:
        return value

    def _parse_time(self, value: Any) -> datetime:
        return value  # type: ignore[no-any-return]

    async def _announce(self, tx: Tx, now: datetime, change: Change) -> None:
        await tx.execute("SELECT pg_notify(?, ?)", CHANGE_CHANNEL, change.encode())

    async def _lock_migrations(self, tx: Tx) -> None:
        await tx.execute("SELECT pg_advisory_xact_lock(?)", _MIGRATION_LOCK)

    async def _run_script(self, tx: Tx, sql: str) -> None:
        await tx.execute(sql)

    async def watch_changes(self, sink: ChangeSink) -> None:
        backoff = 0.05
        warned = False
        while True:
            try:
                conn = await asyncpg.connect(self._listen_dsn, timeout=2.0)
            except FEED_ERRORS as error:
                if not warned:
                    log.warning("change feed: cannot connect to PostgreSQL: %s", error)
                    warned = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _FEED_MAX_BACKOFF)
                continue
            try:
                await self._listen(conn, sink)
            except FEED_ERRORS as error:
                # Any server error (a terminated backend answers ObjectNotInPrerequisiteState
                # to the probe) means the session is gone: listen again on a new one.
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
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can lose a cancellation.
            with suppress(TimeoutError):
                async with asyncio.timeout(_FEED_PROBE_SECONDS):
                    await lost.wait()
            if not lost.is_set():
                # A silently dead network never terminates the connection: probe it.
                await conn.fetchval("SELECT 1", timeout=_FEED_PROBE_SECONDS)
        raise ConnectionError("connection terminated")
