"""A replica's PostgreSQL connections stay within its budget: the pool plus one LISTEN."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from authz.keys import hash_key, mint_key
from authz.models import CLI_ACTOR, NewWorkspace
from authz.settings import Settings
from authz.store import open_store
from tests.support.feeds import Recorder, wait_for

pytestmark = pytest.mark.integration


async def _sessions(dsn: str) -> tuple[int, int]:
    """(all sessions, LISTEN sessions) on this database, this probe's own excluded."""
    admin = await asyncpg.connect(dsn, timeout=10)
    try:
        row = await admin.fetchrow(
            "SELECT count(*) AS total, count(*) FILTER (WHERE query LIKE 'LISTEN%') AS listening "
            "FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        assert row is not None
        return int(row["total"]), int(row["listening"])
    finally:
        await admin.close()


async def test_a_busy_replica_holds_its_pool_plus_one_listen_session(pg_dsn: str) -> None:
    settings = Settings(database_url=pg_dsn, db_timeout_ms=5000)
    store = await open_store(settings.database_url, **settings.store_options())
    await store.migrate()
    workspace = await store.create_workspace(NewWorkspace(name="acme"), actor=CLI_ACTOR)
    secret, key = mint_key(workspace.id, "app")
    await store.create_key(key, actor=CLI_ACTOR)
    recorder = Recorder()
    watcher = asyncio.create_task(store.watch_changes(recorder))
    try:
        await wait_for(recorder, lambda: recorder.resets >= 1)
        # 200 concurrent cache misses: they queue for the pool instead of opening more.
        found = await asyncio.gather(*(store.lookup_key(hash_key(secret)) for _ in range(200)))
        assert all(f is not None for f in found)
        total, listening = await _sessions(pg_dsn)
        assert listening == 1
        assert total <= 3, f"{total} sessions: the budget is 2 pooled + 1 LISTEN"
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await store.close()
