"""Through PgBouncer in transaction mode, configured as the README says, everything works.

The pool goes through the bouncer with asyncpg's statement cache off; migrations and the
change feed's LISTEN session connect to PostgreSQL directly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from authz.keys import hash_key, mint_key
from authz.models import CLI_ACTOR, NewWorkspace, UsageRow
from authz.settings import Settings
from authz.store import open_store
from authz.store.base import Change, ChangeKind
from tests.support.feeds import Recorder, wait_for
from tests.support.pgbouncer import pgbouncer_for, through

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def bouncer_port(pg_base_dsn: str, pgbouncer_binary: str) -> Iterator[int]:
    with pgbouncer_for(pg_base_dsn, pgbouncer_binary) as port:
        yield port


async def test_keys_ledger_and_revocations_work_through_pgbouncer(
    pg_dsn: str, bouncer_port: int
) -> None:
    pooled = through(bouncer_port, pg_dsn)
    direct = await open_store(pg_dsn, read_timeout=2.0)
    assert await direct.migrate()  # migrations: direct
    await direct.close()

    # Two replicas as the README configures them behind PgBouncer.
    options = Settings(
        database_url=pooled,
        database_listen_url=pg_dsn,
        database_statement_cache=False,
        db_timeout_ms=2000,
    ).store_options()
    watcher_store = await open_store(pooled, **options)
    writer = await open_store(pooled, **options)
    recorder = Recorder()
    watcher = asyncio.create_task(watcher_store.watch_changes(recorder))
    try:
        await watcher_store.ping()
        await wait_for(recorder, lambda: recorder.resets >= 1)
        workspace = await writer.create_workspace(NewWorkspace(name="acme"), actor=CLI_ACTOR)
        secret, key = mint_key(workspace.id, "app")
        await writer.create_key(key, actor=CLI_ACTOR)
        # Many transactions on few server connections: a prepared statement would not survive.
        for _ in range(3):
            found = await asyncio.gather(
                *(watcher_store.lookup_key(hash_key(secret)) for _ in range(20))
            )
            assert all(f is not None and f[0].key_id == key.id for f in found)

        hour = datetime(2026, 11, 27, 9, tzinfo=UTC)
        row = UsageRow(hour, workspace.id, key.id, "gpt", 1, 10, 5, 0, 0, 0.01)
        assert await writer.apply_usage_batch("b1", [row, row])
        assert not await watcher_store.apply_usage_batch("b1", [row])
        tokens, spend = await watcher_store.period_totals(workspace.id, hour, hour.replace(hour=10))
        assert tokens == 30
        assert spend == pytest.approx(0.02)

        await writer.revoke_key(key.id, actor=CLI_ACTOR)
        revoked = Change(ChangeKind.KEY, hash_key(secret).hex())
        await wait_for(recorder, lambda: recorder.changes[-1:] == [revoked], timeout=10)
        assert await watcher_store.lookup_key(hash_key(secret)) is None
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await watcher_store.close()
        await writer.close()
