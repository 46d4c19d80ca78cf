"""RedisRateLimiter and buckets.lua on a real standalone Redis."""

from __future__ import annotations

import math

import pytest
from redis.asyncio import Redis

from ratelimit import bucket, quota
from ratelimit.keys import bucket_keys
from ratelimit.limiter import LimitKind, Limits
from ratelimit.redis_backend import RedisClient, RedisRateLimiter, connect_redis
from tests.integration.ratelimit.conftest import GENEROUS_TIMEOUT_SECONDS, FakeClockMs
from tests.support.clocked_redis import ClockedRedisRateLimiter

pytestmark = pytest.mark.integration


@pytest.fixture
async def limiter(redis_client: RedisClient, clock_ms: FakeClockMs) -> RedisRateLimiter:
    """A limiter on the shared test Redis, on the test-only frozen clock."""
    return ClockedRedisRateLimiter(
        redis_client, timeout_seconds=GENEROUS_TIMEOUT_SECONDS, clock_ms=clock_ms
    )


async def commandstats(client: Redis) -> dict[str, tuple[int, int]]:
    """(calls, failed calls) per command since the last CONFIG RESETSTAT."""
    info = await client.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): (int(stats["calls"]), int(stats["failed_calls"]))
        for name, stats in info.items()
    }


async def test_contract_example_on_the_redis_clock(
    redis_client: RedisClient, workspace_id: str
) -> None:
    # No override: the script reads Redis' TIME, as in production.
    limiter = RedisRateLimiter(redis_client, timeout_seconds=GENEROUS_TIMEOUT_SECONDS)
    limits = Limits(rpm=5, tpm=0)
    for _ in range(5):
        assert (await limiter.acquire(workspace_id, limits, 100)).allowed
    denied = await limiter.acquire(workspace_id, limits, 100)
    assert not denied.allowed
    assert denied.denied_by is LimitKind.REQUESTS
    assert math.ceil(denied.retry_after_seconds) == 12


async def test_all_or_nothing(limiter: RedisRateLimiter, workspace_id: str) -> None:
    limits = Limits(rpm=10, tpm=100)
    assert (await limiter.acquire(workspace_id, limits, 90)).allowed
    denied = await limiter.acquire(workspace_id, limits, 20)
    assert denied.denied_by is LimitKind.TOKENS
    assert denied.requests.remaining == 9
    allowed = await limiter.acquire(workspace_id, limits, 10)
    assert allowed.requests.remaining == 8
    assert allowed.tokens.remaining == 0


async def test_too_large_and_refill_on_the_override_clock(
    limiter: RedisRateLimiter, workspace_id: str, clock_ms: FakeClockMs
) -> None:
    limits = Limits(rpm=0, tpm=600)
    too_large = await limiter.acquire(workspace_id, limits, 601)
    assert too_large.too_large
    assert too_large.denied_by is LimitKind.TOKENS
    assert (await limiter.acquire(workspace_id, limits, 600)).allowed
    denied = await limiter.acquire(workspace_id, limits, 25)
    assert denied.retry_after_seconds == 2.5
    clock_ms.advance(2500)
    assert (await limiter.acquire(workspace_id, limits, 25)).allowed


async def test_adjust_refunds_up_to_capacity_and_charges_into_debt(
    limiter: RedisRateLimiter, workspace_id: str
) -> None:
    limits = Limits(rpm=0, tpm=60)
    await limiter.acquire(workspace_id, limits, 40)
    await limiter.adjust_tokens(workspace_id, limits, -1000)
    assert (await limiter.acquire(workspace_id, limits, 0)).tokens.remaining == 60
    await limiter.adjust_tokens(workspace_id, limits, 90)
    denied = await limiter.acquire(workspace_id, limits, 0)
    assert denied.denied_by is LimitKind.TOKENS
    assert denied.retry_after_seconds == 30.0
    assert denied.tokens.reset_seconds == 90.0


async def test_keys_expire_once_the_bucket_would_be_full(
    limiter: RedisRateLimiter, redis_client: RedisClient, workspace_id: str
) -> None:
    """...and not before KEEP_MS, so a workspace's buckets and usage counters expire together."""
    limits = Limits(rpm=6, tpm=60)
    result = await limiter.acquire(workspace_id, limits, 30)
    requests_key, tokens_key = bucket_keys(workspace_id)
    for key, reset in ((requests_key, result.requests), (tokens_key, result.tokens)):
        ttl = await redis_client.pttl(key)
        assert bucket.KEEP_MS - 1000 < ttl <= bucket.KEEP_MS
        assert round(reset.reset_seconds * 1000) + bucket.TTL_MARGIN_MS < bucket.KEEP_MS
    assert bucket.KEEP_MS == quota.COUNTER_TTL_MS
    assert bucket.ttl_ms(1, -(4 * 10**9)) == 4 * 10**9 + 60_000 + bucket.TTL_MARGIN_MS


async def test_unlimited_buckets_store_nothing(
    limiter: RedisRateLimiter, redis_client: RedisClient, workspace_id: str
) -> None:
    for _ in range(3):
        assert (await limiter.acquire(workspace_id, Limits(rpm=0, tpm=0), 10**6)).allowed
    await limiter.adjust_tokens(workspace_id, Limits(rpm=0, tpm=0), 5)
    assert await redis_client.exists(*bucket_keys(workspace_id)) == 0


async def test_a_clock_going_backwards_grants_nothing(
    limiter: RedisRateLimiter, workspace_id: str, clock_ms: FakeClockMs
) -> None:
    limits = Limits(rpm=60, tpm=0)
    for _ in range(60):
        await limiter.acquire(workspace_id, limits, 0)
    clock_ms.advance(-30_000)
    assert not (await limiter.acquire(workspace_id, limits, 0)).allowed
    clock_ms.advance(31_000)
    assert (await limiter.acquire(workspace_id, limits, 0)).allowed


async def test_huge_limits_stay_exact(limiter: RedisRateLimiter, workspace_id: str) -> None:
    limits = Limits(rpm=bucket.MAX_LIMIT, tpm=bucket.MAX_LIMIT)
    assert (await limiter.acquire(workspace_id, limits, bucket.MAX_LIMIT - 1)).allowed
    result = await limiter.acquire(workspace_id, limits, 1)
    assert result.allowed
    assert result.tokens.remaining == 0
    assert result.tokens.reset_seconds == 60.0
    assert result.requests.remaining == bucket.MAX_LIMIT - 2


async def test_ping(limiter: RedisRateLimiter) -> None:
    assert await limiter.ping()


async def test_exactly_one_evalsha_per_call(own_client: Redis, workspace_id: str) -> None:
    limiter = RedisRateLimiter(own_client, timeout_seconds=GENEROUS_TIMEOUT_SECONDS)
    limits = Limits(rpm=1000, tpm=100_000)
    # Load both scripts used below (the NOSCRIPT fallback), one per operation.
    await limiter.acquire(workspace_id, limits, 1)
    await limiter.adjust_tokens(workspace_id, limits, -1)
    await own_client.config_resetstat()
    for _ in range(20):
        await limiter.acquire(workspace_id, limits, 1)
    for _ in range(5):
        await limiter.adjust_tokens(workspace_id, limits, -1)
    stats = await commandstats(own_client)
    assert stats["evalsha"] == (25, 0)
    assert "eval" not in stats
    assert "script|load" not in stats


async def test_script_flush_mid_run_costs_no_request(own_client: Redis, workspace_id: str) -> None:
    limiter = RedisRateLimiter(own_client, timeout_seconds=GENEROUS_TIMEOUT_SECONDS)
    limits = Limits(rpm=100, tpm=0)
    for _ in range(3):
        assert (await limiter.acquire(workspace_id, limits, 0)).allowed
    await own_client.script_flush()
    await own_client.config_resetstat()
    for _ in range(3):
        assert (await limiter.acquire(workspace_id, limits, 0)).allowed
    await limiter.adjust_tokens(workspace_id, Limits(rpm=100, tpm=10), 1)
    stats = await commandstats(own_client)
    # One load per script (acquire, adjust), each after the single attempt that met NOSCRIPT.
    assert stats["script|load"] == (2, 0)
    assert stats["evalsha"] == (3 + 1 + 2, 2)


async def test_works_over_a_unix_socket_url(tmp_path_factory: pytest.TempPathFactory) -> None:
    from tests.support.redis_servers import redis_server

    socket_path = tmp_path_factory.mktemp("sock") / "redis.sock"
    with redis_server(extra_args=["--unixsocket", str(socket_path)]):
        client = connect_redis(f"unix://{socket_path}", timeout_seconds=GENEROUS_TIMEOUT_SECONDS)
        limiter = RedisRateLimiter(client, timeout_seconds=GENEROUS_TIMEOUT_SECONDS)
        try:
            assert (await limiter.acquire("ws", Limits(rpm=1, tpm=1), 1)).allowed
        finally:
            await limiter.close()
