"""PostgreSQL and Redis for the benchmark, and the counters read from them around each run.

Servers come from `AUTHZ_TEST_DATABASE_URL` / `AUTHZ_TEST_REDIS_URL` when set, else throwaway
ones started the way the tests start them (tests/support). A throwaway PostgreSQL is restarted
once with `pg_stat_statements` preloaded, so statements per Check are counted exactly; on a
server we were handed and that lacks it, committed plus rolled-back transactions of the bench
database (pg_stat_database) stand in, and the result says which.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import redis

from tests.support.postgres_server import (
    DATABASE_URL_ENV,
    create_database,
    drop_database,
    start_postgres_server,
)
from tests.support.redis_servers import REDIS_URL_ENV, start_redis_server

STATEMENTS = "pg_stat_statements"
TRANSACTIONS = "pg_stat_database xact_commit + xact_rollback"


async def _fetch(dsn: str, query: str) -> list[Any]:
    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        return list(await connection.fetch(query))
    finally:
        await connection.close()


def pg_query(dsn: str, query: str) -> list[Any]:
    """Run one query on a short-lived connection (the harness is synchronous)."""
    return asyncio.run(_fetch(dsn, query))


@contextlib.contextmanager
def postgres_base_dsn() -> Iterator[str]:
    """A server's base DSN: the configured one, or a throwaway with pg_stat_statements."""
    configured = os.environ.get(DATABASE_URL_ENV)
    if configured:
        yield configured
        return
    with start_postgres_server() as server:
        pg_query(server.dsn, f"ALTER SYSTEM SET shared_preload_libraries = '{STATEMENTS}'")
        server.stop()
        server.start()
        yield server.dsn


@contextlib.contextmanager
def bench_database(base_dsn: str) -> Iterator[str]:
    """A fresh database for one benchmark run, dropped afterwards."""
    dsn = create_database(base_dsn)
    try:
        yield dsn
    finally:
        drop_database(base_dsn, dsn)


@contextlib.contextmanager
def redis_url() -> Iterator[str]:
    """The configured Redis, or a throwaway server for the block."""
    configured = os.environ.get(REDIS_URL_ENV)
    if configured:
        yield configured
        return
    with start_redis_server() as server:
        yield server.url


def redis_commands(url: str) -> dict[str, int]:
    """Calls per command Redis has executed so far, not counting the INFO calls that read this."""
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        stats: dict[str, dict[str, int]] = client.info("commandstats")
    finally:
        client.close()
    return {
        name.removeprefix("cmdstat_"): int(v["calls"])
        for name, v in stats.items()
        if name != "cmdstat_info"
    }


def per_check(before: dict[str, int], after: dict[str, int], checks: int) -> dict[str, float]:
    """Each command's calls between two readings, divided by the Checks in between."""
    return {
        name: (calls - before.get(name, 0)) / checks
        for name, calls in sorted(after.items())
        if calls != before.get(name, 0)
    }


@dataclass(frozen=True, slots=True)
class StatementCounter:
    """Reads a monotonically growing count of the bench database's statements."""

    dsn: str
    method: str

    @classmethod
    def for_database(cls, dsn: str) -> StatementCounter:
        try:
            pg_query(dsn, f"CREATE EXTENSION IF NOT EXISTS {STATEMENTS}")
            pg_query(dsn, f"SELECT count(*) FROM {STATEMENTS}")  # noqa: S608 - constant
        except asyncpg.PostgresError:
            return cls(dsn, TRANSACTIONS)
        return cls(dsn, STATEMENTS)

    def read(self) -> int:
        if self.method == STATEMENTS:
            rows = pg_query(
                self.dsn,
                "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements s"
                " JOIN pg_database d ON d.oid = s.dbid"
                " WHERE d.datname = current_database()"
                " AND s.query NOT LIKE '%pg_stat_statements%'"
                " AND s.query NOT LIKE '%pg_stat_database%'",
            )
        else:
            rows = pg_query(
                self.dsn,
                "SELECT (xact_commit + xact_rollback)::bigint FROM pg_stat_database"
                " WHERE datname = current_database()",
            )
        return int(rows[0][0])
