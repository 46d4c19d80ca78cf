"""What the limiter sends so that a Redis Cluster slot migration can serve it (no server here;
the migration itself runs in tests/integration/ratelimit/test_cluster_migration.py)."""

from __future__ import annotations

from typing import cast

import pytest
from redis.exceptions import TryAgainError

from ratelimit.breaker import BreakerState, CircuitBreaker
from ratelimit.keys import bucket_keys, operations_key, touched_bucket_keys, usage_keys
from ratelimit.limiter import Limits, RateLimitUnavailable
from ratelimit.lua_scripts import one_key_args
from ratelimit.redis_backend import RedisClient, RedisRateLimiter
from tests.unit.ratelimit.test_redis_backend import FakeRedis

PERIOD = "2026-11"


def test_a_bucket_with_no_limit_is_never_named() -> None:
    requests, tokens = bucket_keys("ws1")
    assert touched_bucket_keys("ws1", rpm=5, tpm=100) == (requests, tokens)
    assert touched_bucket_keys("ws1", rpm=5, tpm=0) == (requests, requests)
    assert touched_bucket_keys("ws1", rpm=0, tpm=100) == (tokens, tokens)
    assert touched_bucket_keys("ws1", rpm=0, tpm=0) == (requests, requests)


def test_the_one_key_form_moves_the_other_keys_into_argv() -> None:
    assert one_key_args(["k1", "k2", "k3"], [5, "op"]) == ["k1", 2, "k2", "k3", 5, "op"]
    assert one_key_args(["k1"], [5]) == ["k1", 0, 5]


@pytest.fixture
def fake() -> FakeRedis:
    return FakeRedis()


@pytest.fixture
def limiter(fake: FakeRedis) -> RedisRateLimiter:
    breaker = CircuitBreaker(failure_threshold=3, cooldown_seconds=0.25)
    return RedisRateLimiter(cast(RedisClient, fake), timeout_seconds=0.02, breaker=breaker)


async def test_scripts_name_only_the_keys_they_touch(
    limiter: RedisRateLimiter, fake: FakeRedis
) -> None:
    requests, tokens = bucket_keys("ws1")
    await limiter.acquire("ws1", Limits(rpm=5, tpm=0), 10)
    await limiter.acquire("ws1", Limits(rpm=0, tpm=100), 10)
    fake.script.reply = [1, 2, 3]
    await limiter.record_usage(
        "ws1", Limits(rpm=5, tpm=100), period=PERIOD, tpm_delta=0, tokens=1, spend_micros=1
    )
    await limiter.record_usage(
        "ws1", Limits(rpm=5, tpm=0), period=PERIOD, tpm_delta=5, tokens=1, spend_micros=1
    )
    sent = [keys for keys, _ in fake.script.calls]
    counters = usage_keys("ws1", PERIOD)
    assert sent == [
        (requests, requests),
        (tokens, tokens),
        (counters[0], *counters, operations_key("ws1")),
        (counters[0], *counters, operations_key("ws1")),
    ]


async def test_a_migration_still_in_progress_opens_no_breaker(
    limiter: RedisRateLimiter, fake: FakeRedis
) -> None:
    fake.script.error = TryAgainError("Multiple keys request during rehashing of slot")
    for _ in range(5):
        with pytest.raises(RateLimitUnavailable, match="other"):
            await limiter.acquire("ws1", Limits(rpm=5, tpm=100), 1)
    assert limiter.breaker.state is BreakerState.CLOSED
