"""Exact restores under concurrent flushes (issue 18, finding 8b), on real PostgreSQL and Redis.

Several replicas (each its own accountant, store pool and Redis client, as separate sidecars)
report and flush usage of one workspace at the same time, while the test loses the month's
counters again and again (FLUSHALL, or DEL of one or all of its keys) and other replicas' Checks
seed them. After every cycle, once every replica has written and folded what it holds, the
quota counters must equal the ledger exactly: tokens and micro-USD.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
import redis.asyncio
from prometheus_client import CollectorRegistry

from authz.metrics import Metrics
from authz.models import CLI_ACTOR, NewWorkspace
from authz.resolver import KeyResolver
from authz.store import open_store
from authz.store.base import LedgerSnapshot, Store
from authz.usage.accountant import UsageAccountant
from authz.usage.events import UsageEvent
from authz.usage.periods import period_of
from authz.usage.pricing import PriceTable
from authz.usage.reservations import Claims
from authz.usage.seeding import QuotaSeeder, micros
from ratelimit.breaker import CircuitBreaker
from ratelimit.keys import month_keys
from ratelimit.limiter import Limits, Quota, QuotaState, RateLimiter, RateLimitUnavailable
from ratelimit.memory import InMemoryRateLimiter
from ratelimit.redis_backend import RedisRateLimiter, connect_redis
from tests.support.redis_servers import RedisServer

pytestmark = pytest.mark.integration

NOW = datetime.now(UTC)
PERIOD = period_of(NOW)
REPLICAS = 4
CYCLES = 24
SETTLE_ROUNDS = 200
"""A ceiling on settle passes, not a time bound: each pass awaits real work."""


@dataclass
class Replica:
    store: Store
    limiter: RateLimiter
    accountant: UsageAccountant
    seeder: QuotaSeeder
    metrics: Metrics

    def waiting(self) -> bool:
        m = self.metrics
        gauges = (m.ledger_queue_rows, m.usage_counter_queue, m.usage_fold_queue)
        return any(gauge._value.get() for gauge in gauges)


@dataclass
class Fleet:
    replicas: list[Replica]
    workspace_id: str
    redis: redis.asyncio.Redis | None = None
    server: RedisServer | None = None

    def event(self, rng: random.Random) -> UsageEvent:
        # $1 / $2 per 1M tokens: whole micro-USD per token, so the ledger's float USD sums
        # round back to exact micro-USD and the comparison below can be exact.
        claims = Claims(
            reservation_id=uuid.uuid4().hex,
            workspace_id=self.workspace_id,
            key_id="key_1",
            reserved_tokens=10,
            reserved_at=int(NOW.timestamp()),
            model="m",
            price_in=1.0,
            price_out=2.0,
        )
        return UsageEvent(
            workspace_id=self.workspace_id,
            key_id="key_1",
            reserved_tokens=10,
            model="m",
            prompt_tokens=rng.randint(0, 40),
            completion_tokens=rng.randint(1, 40),
            status=200,
            started_at=NOW,
            upstream_seconds=0.01,
            claims=claims,
        )

    async def settle(self) -> None:
        """Flush every replica until none holds anything: rows, counter updates, folds."""
        for _ in range(SETTLE_ROUNDS):
            for replica in self.replicas:
                await replica.accountant.flush()
            if not any(replica.waiting() for replica in self.replicas):
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the replicas never settled")

    async def counters(self) -> tuple[int, int]:
        replica = self.replicas[0]
        quota = Quota(period=PERIOD, token_quota=0, spend_cap_micros=None)
        for _ in range(3):
            result = await replica.limiter.acquire(self.workspace_id, Limits(0, 0), 0, quota=quota)
            assert result.quota is not None
            if result.quota.known:
                return result.quota.tokens_used, result.quota.spend_used_micros
            await replica.seeder.ensure(self.workspace_id, PERIOD)
        raise AssertionError("the counters stayed missing")

    async def ledger(self) -> tuple[int, int]:
        snapshot = await self.replicas[0].store.ledger_snapshot(self.workspace_id, PERIOD)
        return snapshot.tokens, micros(snapshot.spend_usd)


def sidecar(store: Store, limiter: RateLimiter, metrics: Metrics | None = None) -> Replica:
    """One replica's usage side, wired as `authz.app.build` wires it."""
    metrics = metrics or Metrics(CollectorRegistry())
    seeder = QuotaSeeder(store, limiter, timeout_s=10)
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
        seeder=seeder,
    )
    return Replica(store, limiter, accountant, seeder, metrics)


def slow_snapshots(store: Store, rng: random.Random) -> None:
    """Widen the race a seed is exposed to: the other replicas keep writing and folding between
    its ledger snapshot and its installing it, as on a busy database."""
    read = store.ledger_snapshot

    async def snapshot(workspace_id: str, period: str) -> LedgerSnapshot:
        taken = await read(workspace_id, period)
        await asyncio.sleep(rng.uniform(0, 0.03))
        return taken

    store.ledger_snapshot = snapshot  # type: ignore[method-assign]


@pytest.fixture
async def fleet(pg_dsn: str, own_redis: RedisServer) -> AsyncIterator[Fleet]:
    replicas: list[Replica] = []
    client = redis.asyncio.Redis.from_url(own_redis.url)
    try:
        for _ in range(REPLICAS):
            store = await open_store(pg_dsn, poll_interval=0.05, read_timeout=5, write_timeout=5)
            await store.migrate()
            slow_snapshots(store, random.Random(len(replicas)))
            limiter = RedisRateLimiter(
                connect_redis(own_redis.url, timeout_seconds=0.3),
                timeout_seconds=0.3,
                breaker=CircuitBreaker(failure_threshold=10_000),  # stalls are the test's
            )
            replicas.append(sidecar(store, limiter))
        workspace = await replicas[0].store.create_workspace(
            NewWorkspace(name="w", rpm=0, tpm=0), actor=CLI_ACTOR
        )
        yield Fleet(replicas, workspace.id, client, own_redis)
    finally:
        for replica in replicas:
            await replica.limiter.close()
            await replica.store.close()
        await client.aclose()


async def flusher(fleet: Fleet, replica: Replica, rng: random.Random, rounds: int) -> None:
    """One replica's life during a cycle: its access-log stream reports requests while its
    flush loop writes the ledger, as two tasks (as in the sidecar)."""
    done = asyncio.Event()

    async def reports() -> None:
        try:
            for _ in range(rounds):
                for _ in range(rng.randint(1, 6)):
                    await replica.accountant.record(fleet.event(rng))
                await asyncio.sleep(rng.uniform(0, 0.005))
        finally:
            done.set()

    async def flushes() -> None:
        while not done.is_set():
            await replica.accountant.flush()
            await asyncio.sleep(rng.uniform(0, 0.005))

    await asyncio.gather(reports(), flushes())


async def checker(fleet: Fleet, replica: Replica, stop: asyncio.Event) -> None:
    """A replica's Checks: each one that finds the counters missing seeds them first."""
    quota = Quota(period=PERIOD, token_quota=None, spend_cap_micros=0)
    while not stop.is_set():
        try:
            result = await replica.limiter.acquire(fleet.workspace_id, Limits(0, 0), 0, quota=quota)
            assert result.quota is not None
            if not result.quota.known:
                await replica.seeder.ensure(fleet.workspace_id, PERIOD)
        except RateLimitUnavailable:
            pass  # a stalled Redis: the Check's failure mode applies, the next one tries again
        await asyncio.sleep(0)


async def loser(fleet: Fleet, rng: random.Random, losses: int, stop: asyncio.Event) -> None:
    """Lose the month's counters now and then while the replicas work, or stall Redis so that
    calls run but their replies are lost (their retries meet a month seeded since)."""
    keys = month_keys(fleet.workspace_id, PERIOD)
    for _ in range(losses):
        for _ in range(rng.randint(1, 40)):
            await asyncio.sleep(0)
            await asyncio.sleep(0.001)
        if stop.is_set():
            return
        how = rng.choice(["flushall", "all", "tokens", "spend", "ledger", "stall"])
        assert fleet.redis is not None
        assert fleet.server is not None
        if how == "stall":
            fleet.server.pause()
            try:
                await asyncio.sleep(rng.uniform(0.05, 0.5))
            finally:
                fleet.server.resume()
        elif how == "flushall":
            await fleet.redis.flushall()
        elif how == "all":
            await fleet.redis.delete(*keys)
        else:
            await fleet.redis.delete(keys[("tokens", "spend", "ledger").index(how)])


async def test_counters_equal_the_ledger_after_every_lossy_cycle(fleet: Fleet) -> None:
    rng = random.Random(18)
    for cycle in range(CYCLES):
        stop = asyncio.Event()
        background = [
            asyncio.ensure_future(loser(fleet, rng, rng.randint(1, 4), stop)),
            asyncio.ensure_future(checker(fleet, fleet.replicas[-1], stop)),
        ]
        await asyncio.gather(
            *(
                flusher(fleet, replica, random.Random(rng.random()), rng.randint(3, 8))
                for replica in fleet.replicas
            )
        )
        stop.set()
        await asyncio.gather(*background)
        await fleet.settle()
        assert await fleet.counters() == await fleet.ledger(), f"cycle {cycle}"
    tokens, spend = await fleet.ledger()
    assert tokens > 0
    assert spend > tokens  # every request had output tokens, at $2 per 1M


def replica_redis(fleet: Fleet) -> redis.asyncio.Redis:
    assert fleet.redis is not None
    return fleet.redis


class LostReplies(RedisRateLimiter):
    """Runs `record_usage`, then loses the reply `lose` times, as a Redis timeout does."""

    lose = 0

    async def record_usage(self, *args: Any, **kwargs: Any) -> QuotaState:
        state = await super().record_usage(*args, **kwargs)
        if self.lose:
            self.lose -= 1
            raise RateLimitUnavailable("reply lost")
        return state


async def test_a_retry_after_the_loss_of_its_reply_and_of_the_month_counts_once(
    fleet: Fleet, own_redis: RedisServer
) -> None:
    """A report's counter update ran but its reply was lost; its batch is written and folded;
    then Redis loses everything, the operation ids too. The retry meets a month seeded from a
    snapshot that holds its batch, and must not count it again."""
    replica = fleet.replicas[0]
    limiter = LostReplies(connect_redis(own_redis.url, timeout_seconds=2))
    books = sidecar(replica.store, limiter, replica.metrics).accountant
    try:
        limiter.lose = 2
        await books.record(fleet.event(random.Random(1)))  # applied, reply lost: queued
        await books.flush()  # the retry loses its reply too; the batch is written and folded
        assert replica.metrics.usage_counter_queue._value.get() == 1
        await replica_redis(fleet).flushall()
        await books.flush()  # the retry: the month is seeded from the ledger first
        assert replica.metrics.usage_counter_queue._value.get() == 0
        assert await fleet.counters() == await fleet.ledger()
    finally:
        await limiter.close()


async def test_embedded_restarts_seed_exactly_under_concurrent_flushes(sqlite_url: str) -> None:
    """The embedded default (SQLite, in-process limiter): each restart starts with no counters,
    and the first Checks seed them while the new process already reports and flushes."""
    store = await open_store(sqlite_url, poll_interval=0.05, read_timeout=5, write_timeout=5)
    await store.migrate()
    slow_snapshots(store, random.Random(7))
    workspace = await store.create_workspace(NewWorkspace(name="w", rpm=0, tpm=0), actor=CLI_ACTOR)
    rng = random.Random(8)
    try:
        for restart in range(10):
            replica = sidecar(store, InMemoryRateLimiter())
            fleet = Fleet([replica], workspace.id)
            stop = asyncio.Event()
            checks = asyncio.ensure_future(checker(fleet, replica, stop))
            await flusher(fleet, replica, rng, rng.randint(3, 8))
            stop.set()
            await checks
            await fleet.settle()
            assert await fleet.counters() == await fleet.ledger(), f"restart {restart}"
    finally:
        await store.close()
