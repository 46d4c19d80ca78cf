"""Every database call is bounded, the pool acquire included (a frozen server, not a slow one)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from authz.store.base import StoreUnavailable
from authz.store.dialect import Timeouts
from authz.store.postgres import PostgresStore
from authz.store.sqlite import SqliteStore

pytestmark = pytest.mark.integration


@pytest.fixture
async def frozen_port() -> AsyncIterator[int]:
    """A TCP server that accepts connections and never answers: a hung PostgreSQL."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port: int = server.sockets[0].getsockname()[1]
    try:
        yield port
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_frozen_database_costs_one_read_timeout(frozen_port: int) -> None:
    # The pool's own connect timeout is 2 s and writes get 10 s: answering within a second
    # shows the 150 ms read timeout covers opening the connection for the lookup.
    store = PostgresStore(
        f"postgresql://authz:secret@127.0.0.1:{frozen_port}/authz", timeouts=Timeouts(read=0.15)
    )
    await store.open()
    loop = asyncio.get_running_loop()
    try:
        for read in (store.lookup_key(b"k" * 32), store.get_key("key_x"), store.ping()):
            started = loop.time()
            with pytest.raises(StoreUnavailable, match=r"within 0\.15 s") as caught:
                await read
            assert loop.time() - started < 1.0
            assert "secret" not in str(caught.value)
    finally:
        await store.close()


async def test_every_sqlite_read_is_bounded_too(tmp_path: Path) -> None:
    # Timeouts far below one disk read: each call must give up, none may wait unbounded.
    path = str(tmp_path / "authz.db")
    migrated = SqliteStore(path, timeouts=Timeouts(read=2.0))
    await migrated.open()
    await migrated.migrate()
    await migrated.close()
    store = SqliteStore(path, timeouts=Timeouts(read=1e-9, write=1e-9))
    await store.open()
    try:
        for read in (
            store.lookup_key(b"k" * 32),
            store.get_key("key_x"),
            store.list_keys("ws_x"),
            store.list_workspaces(),
            store.usage_report(),
        ):
            with pytest.raises(StoreUnavailable, match="no answer within"):
                await read
    finally:
        await store.close()
