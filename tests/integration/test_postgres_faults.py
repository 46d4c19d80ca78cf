"""PostgreSQL under faults replicas really meet: concurrent ledger writers, killed connections."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from authz.keys import hash_key, mint_key
from authz.models import CLI_ACTOR, NewWorkspace, UsageRow
from authz.store import open_store
from authz.store.base import Change, ChangeKind, Store
from tests.support.feeds import Recorder, wait_for

pytestmark = pytest.mark.integration
HOUR = datetime(2026, 11, 27, 9, tzinfo=UTC)


@pytest.fixture
async def replicas(pg_dsn: str) -> AsyncIterator[tuple[Store, Store]]:
    """Two sidecars' stores on one migrated database, each with its own pool."""
    first = await open_store(pg_dsn, read_timeout=2.0, pool_size=4)
    second = await open_store(pg_dsn, read_timeout=2.0, pool_size=4)
    await first.migrate()
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


def _rows(count: int) -> list[UsageRow]:
    return [
        UsageRow(
            hour=HOUR + timedelta(hours=n % 3),
            workspace_id=f"ws_{n % 4}",
            key_id=f"key_{n}",
            model="gpt",
            requests=1,
            prompt_tokens=10,
            completion_tokens=5,
            errors_4xx=0,
            errors_5xx=0,
            spend_usd=0.0,
        )
        for n in range(count)
    ]


async def test_concurrent_ledger_writers_in_opposite_orders_count_exactly(
    replicas: tuple[Store, Store],
) -> None:
    # The same 60 hourly rows, written by two replicas at once, one in reverse order: row
    # locks taken in opposite orders deadlock unless every writer sorts its batch first.
    first, second = replicas
    rows = _rows(60)
    rounds = 15
    for n in range(rounds):
        applied = await asyncio.gather(
            first.apply_usage_batch(f"a{n}", rows),
            second.apply_usage_batch(f"b{n}", list(reversed(rows))),
            *(first.apply_usage_batch(f"c{n}-{k}", rows[k::7]) for k in range(3)),
            *(second.apply_usage_batch(f"d{n}-{k}", rows[k::-5][::-1]) for k in range(3)),
        )
        assert all(applied)
    ledger = await first.usage_report()
    expected = {r.key_id: 0 for r in rows}
    for n in range(60):
        expected[f"key_{n}"] = 2 * rounds
    for k in range(3):
        for r in rows[k::7]:
            expected[r.key_id] += rounds
        for r in rows[k::-5]:
            expected[r.key_id] += rounds
    assert {r.key_id: r.requests for r in ledger} == expected
    assert sum(r.prompt_tokens for r in ledger) == 10 * sum(expected.values())


async def _terminate(dsn: str, where: str) -> int:
    """pg_terminate_backend on this database's sessions matching `where`; how many."""
    admin = await asyncpg.connect(dsn, timeout=10)
    try:
        killed: list[asyncpg.Record] = await admin.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = current_database() AND pid <> pg_backend_pid() AND {where}"
        )
        return len(killed)
    finally:
        await admin.close()


async def _admin(dsn: str) -> asyncpg.Connection:
    return await asyncpg.connect(dsn, timeout=10)


async def _wait_until_blocked(dsn: str) -> None:
    """Until some session of this database waits on a lock (the store's write)."""
    admin = await _admin(dsn)
    try:
        async with asyncio.timeout(15):
            while not await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'"
            ):
                await asyncio.sleep(0.01)
    finally:
        await admin.close()


async def test_a_write_whose_connection_is_killed_midway_runs_again(
    replicas: tuple[Store, Store], pg_dsn: str
) -> None:
    first, _ = replicas
    blocker = await _admin(pg_dsn)
    try:
        async with blocker.transaction():
            await blocker.execute("LOCK TABLE usage_batches IN ACCESS EXCLUSIVE MODE")
            write = asyncio.create_task(first.apply_usage_batch("b1", _rows(3)))
            await _wait_until_blocked(pg_dsn)
            assert await _terminate(pg_dsn, "wait_event_type = 'Lock'") == 1
        # The batch id makes the rerun safe; it lands once, on a fresh connection.
        assert await write
    finally:
        await blocker.close()
    assert not await first.apply_usage_batch("b1", _rows(3))
    assert sum(r.requests for r in await first.usage_report()) == 3


async def test_a_deadlock_victim_runs_again(replicas: tuple[Store, Store], pg_dsn: str) -> None:
    first, _ = replicas
    rows = _rows(2)
    assert await first.apply_usage_batch("seed", rows)
    other = await _admin(pg_dsn)
    upsert = "UPDATE usage_hourly SET requests = requests + 1 WHERE key_id = $1"
    try:
        # The store starts waiting first, so its deadlock check runs first and PostgreSQL
        # aborts its transaction; where allowed, the other session checks later still.
        with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
            await other.execute("SET deadlock_timeout = '20s'")
        async with other.transaction():
            await other.execute(upsert, rows[1].key_id)
            write = asyncio.create_task(first.apply_usage_batch("b1", rows))
            await _wait_until_blocked(pg_dsn)
            await other.execute(upsert, rows[0].key_id)
        assert await write
    finally:
        await other.close()
    ledger = {r.key_id: r.requests for r in await first.usage_report()}
    assert ledger == {rows[0].key_id: 3, rows[1].key_id: 3}


async def test_the_change_feed_recovers_from_a_terminated_listen_session(
    replicas: tuple[Store, Store], pg_dsn: str
) -> None:
    watcher_store, writer = replicas
    workspace = await writer.create_workspace(NewWorkspace(name="acme"), actor=CLI_ACTOR)
    recorder = Recorder()
    watcher = asyncio.create_task(watcher_store.watch_changes(recorder))
    try:
        await wait_for(recorder, lambda: recorder.resets >= 1)
        for attempt in range(1, 4):
            killed = await _terminate(pg_dsn, "query LIKE 'LISTEN%'")
            assert killed == 1
            # Reconnected: the cache is reset, and the next revocation arrives.
            await wait_for(recorder, lambda n=attempt: recorder.resets >= n + 1, timeout=15)
            secret, key = mint_key(workspace.id, f"app{attempt}")
            await writer.create_key(key, actor=CLI_ACTOR)
            await writer.revoke_key(key.id, actor=CLI_ACTOR)
            revoked = Change(ChangeKind.KEY, hash_key(secret).hex())
            await wait_for(recorder, lambda r=revoked: recorder.changes.count(r) == 2, timeout=15)
        assert not watcher.done()
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
