"""Persistence: the Store protocol and its SQLite and PostgreSQL implementations."""

from __future__ import annotations

from authz.settings import Settings
from authz.store.base import Store
from authz.store.dialect import Timeouts
from authz.store.postgres import PostgresStore
from authz.store.sqlite import SqliteStore, sqlite_path


async def open_store(settings: Settings, *, migrate_embedded: bool = True) -> Store:
    """Open the configured store; the embedded default migrates itself (nothing to run first)."""
    store: SqliteStore | PostgresStore
    if settings.is_sqlite:
        store = SqliteStore(
            sqlite_path(settings.database_url),
            timeouts=Timeouts(read=settings.db_timeout_ms / 1000),
            poll_seconds=settings.change_poll_ms / 1000,
        )
        await store.open()
        if migrate_embedded:
            await store.migrate()
        return store
    store = PostgresStore(
        settings.database_url,
        timeouts=Timeouts(read=settings.db_timeout_ms / 1000),
        pool_size=settings.db_pool_size,
    )
    await store.open()
    return store
