"""Shared fixtures: real PostgreSQL (env or throwaway), and a store per backend."""

from __future__ import annotations

import gc
import os

# Before anything imports grpc, which reads it once: the tests start PostgreSQL and PgBouncer
# as another OS user (Popen's user=/group=), which makes Python fork() rather than vfork(), and
# gRPC's fork handlers then crash the child before its exec under load (about 1 start in 7
# with calls in flight: "postgres exited with code -11"). No test forks a child that uses gRPC.
os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "false"

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from authz.store import open_store
from authz.store.base import Store
from tests.support.fakes import FakeStore
from tests.support.pgbouncer import find_pgbouncer
from tests.support.postgres_server import create_database, drop_database, postgres_dsn_for_tests


def pytest_configure(config: pytest.Config) -> None:
    """Sidecars start in their own log directories and inherit PYTHONPATH: a relative entry
    (a worktree's `PYTHONPATH=.`) would there import the editable install's code instead."""
    entries = os.environ.get("PYTHONPATH")
    if entries:
        absolute = (str(Path(entry).resolve()) for entry in entries.split(os.pathsep) if entry)
        os.environ["PYTHONPATH"] = os.pathsep.join(absolute)


@pytest.fixture(scope="module", autouse=True)
def _collect_garbage_after_each_module() -> Iterator[None]:
    """Blame a leak on the module that made it.

    An unclosed socket or redis-py connection caught in a reference cycle is only found when
    the garbage collector runs, and pytest reports it (an error: filterwarnings = error) on
    whatever test that happens in, often a later allocation-heavy one such as a Hypothesis
    test. Collecting here, after the module's fixtures are torn down, reports it in the
    teardown of the module's last test instead.
    """
    yield
    gc.collect()


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


@pytest.fixture(scope="session")
def pgbouncer_binary() -> str:
    """Debian's pgbouncer; CI must have it, a developer without it skips those tests."""
    binary = find_pgbouncer()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("pgbouncer is not installed: CI must run the PgBouncer tests")
        pytest.skip("pgbouncer is not installed (Debian: apt-get install -y pgbouncer)")
    return binary


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


StoreOpener = Callable[[], Awaitable[Store]]


@pytest.fixture(params=["fake", "sqlite", "postgres"])
def open_replica(request: pytest.FixtureRequest, tmp_path: Path) -> StoreOpener:
    """Opens connections to one fresh database: the in-memory fake, SQLite or PostgreSQL.

    The store contract suite runs on all three, so the fake unit tests use cannot drift from
    the real stores. Each call is another replica's (or the CLI's) view of the same data.
    """
    if request.param == "fake":
        shared = FakeStore()

        async def open_fake() -> Store:
            return shared.another()

        return open_fake
    url = (
        f"sqlite:///{tmp_path / 'authz.db'}"
        if request.param == "sqlite"
        else str(request.getfixturevalue("pg_dsn"))
    )

    async def open_real() -> Store:
        return await open_store(url, poll_interval=0.02, read_timeout=2.0)

    return open_real


@pytest.fixture
async def store(open_replica: StoreOpener) -> AsyncIterator[Store]:
    opened = await open_replica()
    await opened.migrate()
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def url_store(database_url: str) -> AsyncIterator[Store]:
    """A real store on `database_url`, for tests that also hand that URL to the CLI."""
    opened = await open_store(database_url, poll_interval=0.02, read_timeout=2.0)
    await opened.migrate()
    try:
        yield opened
    finally:
        await opened.close()
