"""Usage counters (monthly token quota and spend cap) on real Redis: standalone and Cluster.

Every test runs on a private standalone server and on the session's 3-master cluster.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass

import pytest

from ratelimit.keys import bucket_keys, usage_keys
from ratelimit.limiter import Limits, Quota, QuotaKind, QuotaState, RateLimiter
from ratelimit.memory import InMemoryRateLimiter
from ratelimit.quota import COUNTER_TTL_SECONDS
from ratelimit.redis_backend import RedisClient, RedisRateLimiter, connect_redis
from tests.integration.ratelimit.conftest import (
    GENEROUS_TIMEOUT_SECONDS,
    T0_MS,
    FakeClockMs,
    run_workers_together,
    worker_argv,
)
from tests.support.clocked_redis import ClockedRedisRateLimiter
from tests.support.redis_servers import redis_server, send_command

pytestmark = pytest.mark.integration

PERIOD = "2025-03"
UNLIMITED = Quota(period=PERIOD, token_quota=None, spend_cap_micros=None)


@dataclass(frozen=True)
class Target:
    """A Redis deployment the test may flush and reset: its URL and every master's port."""

    url: str
    ports: list[int]


@pytest.fixture(params=["standalone", "cluster"])
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    if request.param == "standalone":
        with redis_server() as server:
            yield Target(server.url, [server.port])
    else:
        cluster = request.getfixturevalue("cluster")
        yield Target(cluster.url, [node.port for node in cluster.nodes])


@pytest.fixture
async def client(target: Target) -> AsyncIterator[RedisClient]:
    redis = connect_redis(target.url, timeout_seconds=GENEROUS_TIMEOUT_SECONDS)
    yield redis
    await redis.aclose()


@pytest.fixture
def limiter(client: RedisClient, clock_ms: FakeClockMs) -> RedisRateLimiter:
    return ClockedRedisRateLimiter(
        client, timeout_seconds=GENEROUS_TIMEOUT_SECONDS, clock_ms=clock_ms
    )


def commandstats(ports: Sequence[int]) -> dict[str, tuple[int, int]]:
    """(calls, failed calls) per command since the last reset, summed over every master."""
    totals: dict[str, tuple[int, int]] = {}
    for port in ports:
        for line in send_command(port, "INFO", "commandstats").decode().splitlines():
            if not line.startswith("cmdstat_"):
                continue
            name, _, fields = line.removeprefix("cmdstat_").partition(":")
            stats = dict(field.split("=") for field in fields.split(","))
            calls, failed = totals.get(name, (0, 0))
            totals[name] = (calls + int(stats["calls"]), failed + int(stats["failed_calls"]))
    return totals


def on_every_node(ports: Sequence[int], *command: str) -> None:
    for port in ports:
        assert send_command(port, *command).startswith(b"+OK")


async def read_state(limiter: RateLimiter, workspace: str) -> QuotaState | None:
    """The period's counters through a quota check that limits and debits nothing."""
    return (await limiter.acquire(workspace, Limits(0, 0), 0, quota=UNLIMITED)).quota


async def test_record_usage_charges_the_bucket_and_counts_with_a_ttl(
    limiter: RedisRateLimiter, client: RedisClient, workspace_id: str
) -> None:
    limits = Limits(rpm=0, tpm=100)
    assert (await limiter.acquire(workspace_id, limits, 50)).tokens.remaining == 50
    first = await limiter.record_usage(
        workspace_id, limits, period=PERIOD, tpm_delta=-20, tokens=30, spend_micros=700
    )
    assert first == QuotaState(PERIOD, 30, 700, known=False)
    second = await limiter.record_usage(
        workspace_id, limits, period=PERIOD, tpm_delta=10, tokens=5, spend_micros=1
    )
    assert second == QuotaState(PERIOD, 35, 701, known=True)
    assert (await limiter.acquire(workspace_id, limits, 0)).tokens.remaining == 60
    assert await read_state(limiter, workspace_id) == second
    for key in usage_keys(workspace_id, PERIOD):
        assert COUNTER_TTL_SECONDS - 60 < await client.ttl(key) <= COUNTER_TTL_SECONDS


async def test_a_quota_check_counts_nothing_and_a_denial_debits_nothing(
    limiter: RedisRateLimiter, client: RedisClient, workspace_id: str
) -> None:
    limits = Limits(rpm=10, tpm=1000)
    quota = Quota(period=PERIOD, token_quota=100, spend_cap_micros=1_000)
    await limiter.record_usage(
        workspace_id, Limits(0, 0), period=PERIOD, tpm_delta=0, tokens=60, spend_micros=400
    )
    over = await limiter.acquire(workspace_id, limits, 41, quota=quota)
    assert over.quota_exceeded is QuotaKind.TOKENS
    assert over.denied_by is None
    spend = await limiter.acquire(workspace_id, limits, 40, quota=quota, spend_micros=601)
    assert spend.quota_exceeded is QuotaKind.SPEND
    assert await client.exists(*bucket_keys(workspace_id)) == 0  # no bucket was touched
    for _ in range(3):
        at_quota = await limiter.acquire(workspace_id, limits, 40, quota=quota, spend_micros=600)
        assert at_quota.allowed
        assert at_quota.quota == QuotaState(PERIOD, 60, 400, known=True)  # not incremented
    assert at_quota.requests.remaining == 7


async def test_seed_usage_sets_only_absent_counters(
    limiter: RedisRateLimiter, client: RedisClient, workspace_id: str
) -> None:
    tokens_key, spend_key = usage_keys(workspace_id, PERIOD)
    assert await read_state(limiter, workspace_id) == QuotaState(PERIOD, 0, 0, known=False)
    await limiter.seed_usage(workspace_id, period=PERIOD, tokens=100, spend_micros=2_000)
    assert await read_state(limiter, workspace_id) == QuotaState(PERIOD, 100, 2_000, known=True)
    assert COUNTER_TTL_SECONDS - 60 < await client.ttl(tokens_key) <= COUNTER_TTL_SECONDS

    await client.expire(tokens_key, 100)
    await limiter.seed_usage(workspace_id, period=PERIOD, tokens=1, spend_micros=1)
    assert await read_state(limiter, workspace_id) == QuotaState(PERIOD, 100, 2_000, known=True)
    assert await client.ttl(tokens_key) <= 100  # a refused seed leaves the TTL alone too

    # One counter lost (say, evicted): unknown again; a seed restores that one only.
    await client.delete(spend_key)
    assert await read_state(limiter, workspace_id) == QuotaState(PERIOD, 100, 0, known=False)
    await limiter.seed_usage(workspace_id, period=PERIOD, tokens=999, spend_micros=555)
    assert await read_state(limiter, workspace_id) == QuotaState(PERIOD, 100, 555, known=True)


async def test_concurrent_record_usage_from_two_processes_sums_exactly(
    target: Target, limiter: RedisRateLimiter, workspace_id: str
) -> None:
    processes, calls = 2, 100
    limits = Limits(rpm=0, tpm=10_000)
    assert (await limiter.acquire(workspace_id, limits, 5_000)).allowed
    argv = worker_argv("usage_worker", target.url, workspace_id, PERIOD, calls, T0_MS, limits.tpm)
    counts = run_workers_together([argv] * processes)
    assert [c["failed"] for c in counts] == [0] * processes
    assert sum(c["recorded"] for c in counts) == processes * calls
    per_process = calls * (calls + 1) // 2  # call i records i+1 tokens and 1000*(i+1) micro-USD
    assert await read_state(limiter, workspace_id) == QuotaState(
        PERIOD, processes * per_process, processes * per_process * 1000, known=True
    )
    # Every call refunded one token to the bucket, on the same frozen clock.
    after = await limiter.acquire(workspace_id, limits, 0)
    assert after.tokens.remaining == 5_000 + processes * calls


async def test_exactly_one_evalsha_per_call(
    target: Target, limiter: RedisRateLimiter, workspace_id: str
) -> None:
    limits = Limits(rpm=1000, tpm=100_000)
    quota = Quota(period=PERIOD, token_quota=10**9, spend_cap_micros=10**9)
    # Load the three scripts used below (one per operation).
    await limiter.acquire(workspace_id, limits, 1, quota=quota)
    await limiter.record_usage(
        workspace_id, limits, period=PERIOD, tpm_delta=0, tokens=0, spend_micros=0
    )
    await limiter.seed_usage(workspace_id, period=PERIOD, tokens=1, spend_micros=1)
    on_every_node(target.ports, "CONFIG", "RESETSTAT")
    for _ in range(20):
        assert (await limiter.acquire(workspace_id, limits, 1, quota=quota, spend_micros=5)).allowed
    for _ in range(5):
        await limiter.record_usage(
            workspace_id, limits, period=PERIOD, tpm_delta=-1, tokens=1, spend_micros=1
        )
    for _ in range(3):
        await limiter.seed_usage(workspace_id, period=PERIOD, tokens=1, spend_micros=1)
    stats = commandstats(target.ports)
    assert stats["evalsha"] == (28, 0)
    assert "eval" not in stats
    assert "script|load" not in stats


@pytest.mark.parametrize("operation", ["acquire_quota", "record", "seed"])
async def test_script_flush_costs_no_call(
    target: Target, limiter: RedisRateLimiter, workspace_id: str, operation: str
) -> None:
    limits = Limits(rpm=100, tpm=1000)
    await limiter.acquire(workspace_id, limits, 1)
    on_every_node(target.ports, "SCRIPT", "FLUSH")
    on_every_node(target.ports, "CONFIG", "RESETSTAT")
    if operation == "acquire_quota":
        result = await limiter.acquire(workspace_id, limits, 1, quota=UNLIMITED)
        assert result.allowed
        assert result.quota == QuotaState(PERIOD, 0, 0, known=False)
    elif operation == "record":
        state = await limiter.record_usage(
            workspace_id, limits, period=PERIOD, tpm_delta=1, tokens=2, spend_micros=3
        )
        assert state == QuotaState(PERIOD, 2, 3, known=False)
    else:
        await limiter.seed_usage(workspace_id, period=PERIOD, tokens=4, spend_micros=5)
    stats = commandstats(target.ports)
    if operation == "seed":  # read through acquire_quota, whose script the flush removed too
        assert await read_state(limiter, workspace_id) == QuotaState(PERIOD, 4, 5, known=True)
    # The attempt that met NOSCRIPT, then the one after redis-py reloaded the script.
    assert stats["evalsha"][1] == 1
    assert stats["evalsha"][0] == 2
    # The script is loaded once, on the node that answered NOSCRIPT (on a cluster, the other
    # masters load it when they need it: a dead one must not fail this call).
    assert stats["script|load"] == (1, 0)


async def test_a_record_retried_with_its_operation_id_counts_once_on_both_backends(
    limiter: RedisRateLimiter, workspace_id: str
) -> None:
    memory = InMemoryRateLimiter(clock_ms=lambda: T0_MS)
    limits = Limits(rpm=0, tpm=100)
    for backend in (limiter, memory):
        replies = [
            await backend.record_usage(
                workspace_id,
                limits,
                period=PERIOD,
                tpm_delta=-5,
                tokens=tokens,
                spend_micros=7,
                operation_id=operation,
            )
            for operation, tokens in (("op-1", 30), ("op-1", 30), ("op-2", 4))
        ]
        assert replies == [
            QuotaState(PERIOD, 30, 7, known=False),
            QuotaState(PERIOD, 30, 7, known=False),
            QuotaState(PERIOD, 34, 14, known=True),
        ]
        assert await read_state(backend, workspace_id) == replies[-1]
