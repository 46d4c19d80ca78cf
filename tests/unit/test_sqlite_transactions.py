"""The embedded store after a caller is cancelled mid-transaction (a timeout on a busy machine).

aiosqlite runs every statement on its thread in order, even when the coroutine that sent it was
cancelled: a BEGIN whose caller timed out still runs, and used to leave the connection inside a
transaction that nobody ended. Every later write then failed with "cannot start a transaction
within a transaction" (seen as a ledger that never flushed under `make run`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import suppress
from pathlib import Path

import pytest

from authz.models import CLI_ACTOR, ModelPrice
from authz.store import open_store
from authz.store.sqlite import SqliteStore


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = await open_store(f"sqlite:///{tmp_path / 'authz.db'}")
    assert isinstance(opened, SqliteStore)
    await opened.migrate()
    try:
        yield opened
    finally:
        await opened.close()


async def cancel_then_write(store: SqliteStore, abandoned: asyncio.Task[None]) -> None:
    """Cancel the abandoned transaction's caller; the next write and read work, and only it
    is there."""
    abandoned.cancel()
    with suppress(asyncio.CancelledError):
        await abandoned
    await store.set_price(ModelPrice("gpt-4o", 2.5, 10.0), actor=CLI_ACTOR)
    assert [p.model for p in await store.list_prices()] == ["gpt-4o"]


async def test_a_transaction_cancelled_at_its_begin_does_not_wedge_the_next(
    store: SqliteStore,
) -> None:
    async def abandoned() -> None:
        async with store._transaction():
            await asyncio.sleep(3600)

    task = asyncio.create_task(abandoned())
    await asyncio.sleep(0)  # it holds the lock and waits on its BEGIN
    await cancel_then_write(store, task)


async def test_a_transaction_cancelled_inside_rolls_its_writes_back(store: SqliteStore) -> None:
    started = asyncio.Event()

    async def abandoned() -> None:
        async with store._transaction() as tx:
            await tx.execute(
                "INSERT INTO model_prices (model, input_per_1m_usd, output_per_1m_usd,"
                " updated_at) VALUES ('abandoned', 1.0, 1.0, '2026-11-29T00:00:00.000000Z')"
            )
            started.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(abandoned())
    await started.wait()
    await cancel_then_write(store, task)
