"""Shared fixtures: real PostgreSQL (env or throwaway), and a store per backend."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from authz.store import open_store
from authz.store.base import Store
from tests.support.postgres_server import create_database, drop_database, postgres_dsn_for_tests


@pytest.fixture(scope="session")
def pg_base_dsn() -> Iterator[str]:
    """AUTHZ_TEST_DATABASE_URL when set, else a throwaway server for the whole session."""
    with postgres_dsn_for_tests() as dsn:
        yield dsn


@pytest.fixture
def pg_dsn(pg_base_dsn: str) -> Iterator[str]:
    """A fresh, empty database for one test."""
    dsn = create_database(pg_base_dsn)
    yield dsn
    drop_database(pg_base_dsn, dsn)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'authz.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using this runs once on the embedded store and once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'authz.db'}"
    dsn: str = request.getfixturevalue("pg_dsn")
    return dsn


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    opened = await open_store(database_url, poll_interval=0.02, read_timeout=2.0)
    await opened.migrate()
    try:
        yield opened
    finally:
        await opened.close()
