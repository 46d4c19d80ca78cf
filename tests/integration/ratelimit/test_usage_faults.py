"""Every report counted exactly once, eventually, with real faults: the ledger (PostgreSQL) and
the quota counters (Redis) agree after Redis pauses and restarts, a locked workspaces table,
and killed database connections. Each test makes its fault itself."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
import pytest
import redis.asyncio
from envoy.data.accesslog.v3.accesslog_pb2 import HTTPAccessLogEntry
from google.protobuf.struct_pb2 import Struct
from prometheus_client import CollectorRegistry

from authz.metrics import Metrics
from authz.models import CLI_ACTOR, NewWorkspace
from authz.resolver import KeyResolver
from authz.store import open_store
from authz.store.base import Store
from authz.usage.accountant import UsageAccountant
from authz.usage.events import parse_entry
from authz.usage.periods import period_bounds, period_of
from authz.usage.pricing import PriceTable
from ratelimit.keys import usage_keys
from ratelimit.limiter import Limits, Quota
from ratelimit.redis_backend import RedisRateLimiter, connect_redis
from tests.support.redis_servers import RedisServer

pytestmark = pytest.mark.integration

NOW = datetime.now(UTC)
PERIOD = period_of(NOW)


@dataclass
class Books:
    store: Store
    limiter: RedisRateLimiter
    accountant: UsageAccountant
    metrics: Metrics
    workspace_id: str

    async def report(self, tokens: int) -> None:
        log = HTTPAccessLogEntry()
        log.common_properties.start_time.FromDatetime(NOW)
        log.response.response_code.value = 200
        authz = Struct()
        authz.update({"decision": "allow", "workspace_id": self.workspace_id, "key_id": "key_1"})
        usage = Struct()
        usage.update({"prompt_tokens": 0, "completion_tokens": tokens})
        metadata = log.common_properties.metadata.filter_metadata
        metadata["envoy.filters.http.ext_authz"].CopyFrom(authz)
        metadata["oais.usage"].CopyFrom(usage)
        event = parse_entry(log)
        assert event is not None
        await self.accountant.record(event)

    async def settle(self) -> None:
        """Flush until nothing waits: the ledger written, every counter update applied."""
        deadline = time.monotonic() + 30
        while True:
            await self.accountant.flush()
            waiting = self.metrics.usage_counter_queue._value.get()
            if not waiting and not self.metrics.ledger_queue_rows._value.get():
                return
            assert time.monotonic() < deadline, "the books never settled"
            await asyncio.sleep(0.05)

    async def counters(self) -> int:
        quota = Quota(period=PERIOD, token_quota=None, spend_cap_micros=None)
        state = (await self.limiter.acquire(self.workspace_id, Limits(0, 0), 0, quota=quota)).quota
        assert state is not None
        return state.tokens_used

    async def ledger(self) -> int:
        start, end = period_bounds(PERIOD)
        tokens, _ = await self.store.period_totals(self.workspace_id, start, end)
        return tokens


@pytest.fixture
async def books(pg_dsn: str, own_redis: RedisServer) -> AsyncIterator[Books]:
    store = await open_store(pg_dsn, poll_interval=0.02, read_timeout=0.5, write_timeout=2.0)
    await store.migrate()
    workspace = await store.create_workspace(NewWorkspace(name="w", tpm=0), actor=CLI_ACTOR)
    limiter = RedisRateLimiter(connect_redis(own_redis.url, timeout_seconds=0.2))
    metrics = Metrics(CollectorRegistry())
    resolver = KeyResolver(
        store, metrics, size=10, ttl=60, negative_size=10, negative_ttl=10, stale_if_error=0
    )
    accountant = UsageAccountant(
        store=store,
        limiter=limiter,
        resolver=resolver,
        prices=PriceTable(),
        metrics=metrics,
        flush_interval=60,
    )
    try:
        yield Books(store, limiter, accountant, metrics, workspace.id)
    finally:
        await limiter.close()
        await store.close()


async def test_a_redis_pause_loses_no_report(books: Books, own_redis: RedisServer) -> None:
    await books.report(1000)
    await books.settle()
    own_redis.pause()
    try:
        await books.report(2000)  # the counter update times out: queued, the ledger keeps it
        await books.accountant.flush()
    finally:
        own_redis.resume()
    await books.settle()
    assert await books.ledger() == 3000
    assert await books.counters() == 3000


async def test_a_redis_restart_is_restored_from_the_ledger_once(
    books: Books, own_redis: RedisServer
) -> None:
    await books.report(1000)
    await books.settle()
    own_redis.restart()  # no persistence: the counters are gone
    await books.report(500)
    await books.settle()
    await books.report(1)
    await books.settle()
    assert await books.ledger() == 1501
    assert await books.counters() == 1501


async def test_a_locked_workspaces_table_delays_the_counters_never_the_ledger(
    books: Books, pg_dsn: str
) -> None:
    locker = await asyncpg.connect(pg_dsn)
    try:
        async with locker.transaction():
            await locker.execute("LOCK TABLE workspaces IN ACCESS EXCLUSIVE MODE")
            await books.report(500)  # the uncached workspace lookup times out
            await books.accountant.flush()
            assert await books.ledger() == 500  # usage_hourly is not locked
            assert books.metrics.usage_counter_queue._value.get() == 1
    finally:
        await locker.close()
    await books.settle()
    assert await books.counters() == 500


async def test_killed_database_connections_lose_no_report(books: Books, pg_dsn: str) -> None:
    await books.report(100)
    await books.settle()
    killer = await asyncpg.connect(pg_dsn)
    try:
        await killer.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await killer.close()
    await books.report(200)
    await books.settle()
    assert await books.ledger() == 300
    assert await books.counters() == 300


async def test_one_evicted_counter_is_restored_alone(books: Books, own_redis: RedisServer) -> None:
    await books.report(1000)
    await books.settle()
    client = redis.asyncio.Redis.from_url(own_redis.url)
    try:
        _, spend_key = usage_keys(books.workspace_id, PERIOD)
        assert await client.delete(spend_key) == 1  # evicted; the token counter survives
    finally:
        await client.aclose()
    await books.report(500)
    await books.settle()
    assert await books.ledger() == 1500
    assert await books.counters() == 1500  # the ledger was not added to the survivor
