"""Persistence: the Store protocol on SQLite (embedded) or PostgreSQL.

Depends on neither settings nor sign-in: the caller passes the URL and plain options.
"""

from __future__ import annotations

from typing import TypedDict, Unpack

from authz.store.base import Store
from authz.store.dialect import Timeouts
from authz.store.postgres import PoolObserver, PostgresStore
from authz.store.sqlite import SqliteStore, sqlite_path
from authz.urls import is_sqlite_url


class StoreOptions(TypedDict, total=False):
    """What `open_store` may be told besides the URL (seconds, counts)."""

    read_timeout: float
    """Point reads on the request path, pool acquire included."""
    write_timeout: float
    """Transactions, lists and reports."""
    pool_size: int
    """PostgreSQL: connections in the pool (the change feed holds one more)."""
    poll_interval: float
    """SQLite: how often the change feed reads the changes table."""
    listen_url: str | None
    """PostgreSQL: where the change feed LISTENs (a direct connection past PgBouncer)."""
    statement_cache: bool
    """PostgreSQL: asyncpg's prepared-statement cache (off behind PgBouncer transaction mode)."""
    pool_observer: PoolObserver | None
    """PostgreSQL: told how the pool is used (connections in use, acquires that waited)."""


async def open_store(
    url: str, *, migrate_embedded: bool = True, **options: Unpack[StoreOptions]
) -> Store:
    """Open the store at `url`; the embedded default migrates itself (nothing to run first)."""
    timeouts = Timeouts(
        read=options.get("read_timeout", 0.15), write=options.get("write_timeout", 10.0)
    )
    store: SqliteStore | PostgresStore
    if is_sqlite_url(url):
        store = SqliteStore(
            sqlite_path(url),
            timeouts=timeouts,
            poll_seconds=options.get("poll_interval", 0.25),
        )
        await store.open()
        if migrate_embedded:
            await store.migrate()
        return store
    store = PostgresStore(
        url,
        timeouts=timeouts,
        pool_size=options.get("pool_size", 2),
        listen_dsn=options.get("listen_url"),
        statement_cache=options.get("statement_cache", True),
        observer=options.get("pool_observer"),
    )
    await store.open()
    return store
