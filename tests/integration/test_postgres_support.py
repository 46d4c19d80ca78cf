"""The Postgres test support really gives working, isolated, restartable databases."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.support.postgres_server import (
    DATABASE_URL_ENV,
    PostgresServer,
    PostgresStartError,
    create_database,
    drop_database,
    dsn_with_database,
    postgres_dsn_for_tests,
    start_postgres_server,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server() -> Iterator[PostgresServer]:
    """One throwaway server for the module; the restart test leaves it running again."""
    with start_postgres_server() as server:
        yield server


async def _select_one(dsn: str) -> int:
    connection = await asyncpg.connect(dsn, timeout=5)
    try:
        value: int = await connection.fetchval("SELECT 1")
        return value
    finally:
        await connection.close()


async def test_throwaway_server_accepts_connections(server: PostgresServer) -> None:
    assert server.dsn == f"postgresql://postgres@127.0.0.1:{server.port}/postgres"
    assert await _select_one(server.dsn) == 1


async def test_created_databases_are_isolated_and_droppable(server: PostgresServer) -> None:
    first = create_database(server.dsn)
    second = create_database(server.dsn)
    try:
        assert first != second
        connection = await asyncpg.connect(first)
        try:
            await connection.execute("CREATE TABLE marker (id int)")
        finally:
            await connection.close()
        connection = await asyncpg.connect(second)
        try:
            exists = await connection.fetchval("SELECT to_regclass('marker') IS NOT NULL")
        finally:
            await connection.close()
        assert exists is False
    finally:
        drop_database(server.dsn, first)
        drop_database(server.dsn, second)
    with pytest.raises(asyncpg.InvalidCatalogNameError):
        await asyncpg.connect(first)


async def test_drop_database_closes_leftover_connections(server: PostgresServer) -> None:
    dsn = create_database(server.dsn)
    leftover = await asyncpg.connect(dsn)
    drop_database(server.dsn, dsn)
    assert not await _still_usable(leftover)


async def _still_usable(connection: asyncpg.Connection) -> bool:
    try:
        await connection.fetchval("SELECT 1")
    except (asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError):
        return False
    finally:
        connection.terminate()
    return True


async def test_kill_and_restart_on_same_port(server: PostgresServer) -> None:
    dsn = create_database(server.dsn)
    connection = await asyncpg.connect(dsn)
    await connection.execute("CREATE TABLE survives (id int); INSERT INTO survives VALUES (7)")
    port = server.port

    # Committed rows must survive a crash, as they would in production.
    server.kill()
    assert not server.is_running()
    assert not await _still_usable(connection)
    with pytest.raises(ConnectionRefusedError):
        await asyncpg.connect(dsn, timeout=2)

    server.start()
    assert server.port == port
    connection = await asyncpg.connect(dsn)
    try:
        assert await connection.fetchval("SELECT id FROM survives") == 7
    finally:
        await connection.close()
    drop_database(server.dsn, dsn)


async def test_stop_and_start_again(server: PostgresServer) -> None:
    server.stop()
    assert not server.is_running()
    server.start()
    assert await _select_one(server.dsn) == 1


def test_server_log_is_kept(server: PostgresServer) -> None:
    assert "database system is ready to accept connections" in server.read_log()


def test_dsn_rule_prefers_environment() -> None:
    configured = "postgresql://someone@db.example:5433/base?sslmode=disable"
    with postgres_dsn_for_tests({DATABASE_URL_ENV: configured}) as dsn:
        assert dsn == configured
    assert (
        dsn_with_database(configured, "t1")
        == "postgresql://someone@db.example:5433/t1?sslmode=disable"
    )


async def test_dsn_rule_starts_throwaway_without_environment() -> None:
    environ = {key: value for key, value in os.environ.items() if key != DATABASE_URL_ENV}
    with postgres_dsn_for_tests(environ) as dsn:
        assert dsn.startswith("postgresql://postgres@127.0.0.1:")
        assert await _select_one(dsn) == 1


def _children_of(pid: int) -> list[int]:
    """Pids whose parent is `pid` (postgres gives each child its own session, so no pgid)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


async def test_close_leaves_no_processes_or_files() -> None:
    server = start_postgres_server()
    connection = await asyncpg.connect(server.dsn)  # one more child: its backend
    postmaster = server.pid
    assert postmaster is not None
    children = _children_of(postmaster)
    assert children
    server.close()
    connection.terminate()
    assert not Path(f"/proc/{postmaster}").exists()
    assert [pid for pid in children if Path(f"/proc/{pid}").exists()] == []
    assert not server.base_dir.exists()


def test_start_failure_reports_the_log_and_start_can_be_retried() -> None:
    with start_postgres_server() as server:
        server.stop()
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", server.port))
            squatter.listen()
            with pytest.raises(PostgresStartError, match="could not bind"):
                server.start(timeout=10)
        assert not server.is_running()
        server.start()
        assert server.is_running()
