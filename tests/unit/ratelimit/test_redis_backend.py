"""RedisRateLimiter's error handling and breaker, against a fake client (no server)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, cast

import pytest
from prometheus_client import CollectorRegistry
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ratelimit import bucket
from ratelimit.breaker import BreakerState, CircuitBreaker
from ratelimit.keys import bucket_keys, operations_key, usage_keys
from ratelimit.limiter import (
    LimitKind,
    Limits,
    Quota,
    QuotaKind,
    QuotaState,
    RateLimitUnavailable,
)
from ratelimit.lua_scripts import Operation, script_text
from ratelimit.metrics import RateLimitMetrics
from ratelimit.quota import COUNTER_TTL_SECONDS, MAX_COUNTER
from ratelimit.redis_backend import OPERATION_TTL_SECONDS, RedisClient, RedisRateLimiter
from tests.support.clock import FakeClock
from tests.support.clocked_redis import ClockedRedisRateLimiter


class FakeScript:
    """Stands in for redis-py's AsyncScripts (one per operation, sharing this state): records
    calls and the operation each went to, replies or fails as told."""

    def __init__(self) -> None:
        self.calls: list[tuple[Sequence[str], Sequence[Any]]] = []
        self.operations: list[str] = []
        self.reply: list[int] = [1, 0, 0, 0, 4, 12000, 90, 6000]
        self.error: BaseException | None = None
        self.fail_next: list[BaseException] = []
        self.hang = False

    async def __call__(self, operation: str, keys: Sequence[str], args: Sequence[Any]) -> list[int]:
        self.calls.append((keys, args))
        self.operations.append(operation)
        if self.hang:
            await asyncio.Event().wait()  # never set: a Redis that does not answer
        if self.fail_next:
            raise self.fail_next.pop(0)
        if self.error is not None:
            raise self.error
        return self.reply


class OneScript:
    def __init__(self, shared: FakeScript, operation: str) -> None:
        self.shared, self.operation = shared, operation

    async def __call__(self, keys: Sequence[str], args: Sequence[Any]) -> list[int]:
        return await self.shared(self.operation, keys, args)


class FakeRedis:
    def __init__(self) -> None:
        self.script = FakeScript()
        self.script_texts: list[str] = []
        self.closed = False
        self.ping_error: BaseException | None = None

    def register_script(self, text: str) -> OneScript:
        self.script_texts.append(text)
        # Which operation: the one whose body the text ends with (test clocks differ in front).
        [operation] = [op for op in Operation if text.endswith(script_text(op)[-200:])]
        return OneScript(self.script, operation)

    async def ping(self) -> bool:
        if self.ping_error is not None:
            raise self.ping_error
        return True

    async def aclose(self) -> None:
        self.closed = True


def state(limiter: RedisRateLimiter) -> BreakerState:
    """Read the state through a call, so mypy does not narrow it across transitions."""
    return limiter.breaker.state


@pytest.fixture
def fake() -> FakeRedis:
    return FakeRedis()


@pytest.fixture
def clock() -> FakeClock[float]:
    return FakeClock(0.0)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def limiter(
    fake: FakeRedis, clock: FakeClock[float], registry: CollectorRegistry
) -> RedisRateLimiter:
    metrics = RateLimitMetrics(registry)
    breaker = CircuitBreaker(failure_threshold=3, cooldown_seconds=0.25, clock=clock)
    return RedisRateLimiter(
        cast(RedisClient, fake), timeout_seconds=0.02, breaker=breaker, metrics=metrics
    )


def errors(registry: CollectorRegistry, kind: str) -> float | None:
    return registry.get_sample_value("authz_ratelimit_redis_errors_total", {"kind": kind})


async def test_registers_the_packaged_scripts_and_sends_keys_and_args(
    limiter: RedisRateLimiter, fake: FakeRedis
) -> None:
    assert fake.script_texts == [script_text(op) for op in Operation]
    result = await limiter.acquire("ws1", Limits(rpm=5, tpm=100), 10)
    assert result.allowed
    assert result.requests.remaining == 4
    assert result.requests.reset_seconds == 12.0
    assert fake.script.calls == [(bucket_keys("ws1"), [5, 100, 10])]
    assert fake.script.operations == ["acquire"]


def sent_operation(keys: Sequence[str], args: Sequence[Any], workspace_id: str) -> None:
    """The last key is the workspace's operations hash, the last argument a fresh id."""
    assert keys[-1] == operations_key(workspace_id)
    assert isinstance(args[-1], str)
    assert len(args[-1]) == 32


async def test_decodes_a_denial(limiter: RedisRateLimiter, fake: FakeRedis) -> None:
    fake.script.reply = [0, 2, 1, 0, 5, 0, 100, 0]
    result = await limiter.acquire("ws1", Limits(rpm=5, tpm=100), 1000)
    assert not result.allowed
    assert result.denied_by is LimitKind.TOKENS
    assert result.too_large


async def test_adjust_sends_a_clamped_delta_and_skips_no_ops(
    limiter: RedisRateLimiter, fake: FakeRedis
) -> None:
    await limiter.adjust_tokens("ws1", Limits(rpm=5, tpm=100), 10**30)
    await limiter.adjust_tokens("ws1", Limits(rpm=5, tpm=0), 10)
    await limiter.adjust_tokens("ws1", Limits(rpm=5, tpm=100), 0)
    [(keys, args)] = fake.script.calls
    assert keys[0] == bucket_keys("ws1")[1]
    sent_operation(keys, args, "ws1")
    # Overuse is carried whole as debt; only the exactness bound cuts it (issue 17, finding 6).
    assert args[:-1] == [100, bucket.MAX_CHARGE, OPERATION_TTL_SECONDS]
    assert fake.script.operations == ["adjust"]


async def test_test_clock_is_passed_as_the_now_override(fake: FakeRedis) -> None:
    limiter = ClockedRedisRateLimiter(cast(RedisClient, fake), clock_ms=lambda: 1234)
    await limiter.acquire("ws1", Limits(rpm=5, tpm=100), 10)
    assert fake.script.calls[0][1] == [5, 100, 10, 1234]


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (RedisConnectionError("refused"), "connection"),
        (RedisTimeoutError("slow"), "timeout"),
        (ResponseError("OOM command not allowed"), "other"),
        (OSError("network is unreachable"), "other"),
    ],
)
async def test_redis_errors_become_unavailable(
    limiter: RedisRateLimiter,
    fake: FakeRedis,
    registry: CollectorRegistry,
    error: BaseException,
    kind: str,
) -> None:
    fake.script.error = error
    with pytest.raises(RateLimitUnavailable):
        await limiter.acquire("ws1", Limits(rpm=5, tpm=100), 10)
    assert errors(registry, kind) == 1


async def test_a_hung_call_times_out(
    limiter: RedisRateLimiter, fake: FakeRedis, registry: CollectorRegistry
) -> None:
    fake.script.hang = True
    with pytest.raises(RateLimitUnavailable, match="timeout"):
        await limiter.acquire("ws1", Limits(rpm=5, tpm=100), 10)
    assert len(fake.script.calls) == 1  # a timeout is never retried: the script may have run
    assert errors(registry, "timeout") == 1
    assert (
        registry.get_sample_value("authz_ratelimit_redis_seconds_count", {"operation": "acquire"})
        == 1
    )


async def test_one_connection_error_is_retried_on_a_fresh_connection(
    limiter: RedisRateLimiter, fake: FakeRedis, registry: CollectorRegistry
) -> None:
    fake.script.fail_next = [RedisConnectionError("Connection closed by server.")]
    assert (await limiter.acquire("ws1", Limits(rpm=5, tpm=100), 10)).allowed
    assert len(fake.script.calls) == 2
    assert errors(registry, "connection") == 0
    assert state(limiter) is BreakerState.CLOSED


async def test_a_second_connection_error_is_not_retried(
    limiter: RedisRateLimiter, fake: FakeRedis
) -> None:
    fake.script.fail_next = [RedisConnectionError("refused"), RedisConnectionError("refused")]
    with pytest.raises(RateLimitUnavailable, match="connection"):
        await limiter.acquire("ws1", Limits(rpm=5, tpm=100), 10)
    assert len(fake.script.calls) == 2


async def test_any_client_exception_is_contained_and_counted(
    limiter: RedisRateLimiter, fake: FakeRedis, registry: CollectorRegistry
) -> None:
    # redis-py's cluster client raises these when it closes itself under calls in flight.
    for error in (RuntimeError("handler is closed"), AttributeError("'NoneType' object")):
        fake.script.error = error
        with pytest.raises(RateLimitUnavailable, match="client"):
            await limiter.acquire("ws1", Limits(rpm=5, tpm=100), 10)
    assert errors(registry, "client") == 2


async def test_breaker_opens_fails_fast_probes_and_closes(
    limiter: RedisRateLimiter, fake: FakeRedis, clock: FakeClock[float], registry: CollectorRegistry
) -> None:
    fake.script.error = RedisConnectionError("refused")
    limits = Limits(rpm=5, tpm=100)
    for _ in range(3):
        with pytest.raises(RateLimitUnavailable):
            await limiter.acquire("ws1", limits, 1)
    assert state(limiter) is BreakerState.OPEN
    assert registry.get_sample_value("authz_ratelimit_circuit_state") == 2

    for _ in range(5):
        with pytest.raises(RateLimitUnavailable, match="circuit is open"):
            await limiter.acquire("ws1", limits, 1)
    assert len(fake.script.calls) == 6  # each call tried twice; nothing reached Redis while open
    assert errors(registry, "circuit_open") == 5

    clock.now += 0.25
    fake.script.error = None
    assert (await limiter.acquire("ws1", limits, 1)).allowed
    assert state(limiter) is BreakerState.CLOSED
    assert registry.get_sample_value("authz_ratelimit_circuit_state") == 0


async def test_ping(limiter: RedisRateLimiter, fake: FakeRedis) -> None:
    assert await limiter.ping()
    fake.ping_error = RedisConnectionError("refused")
    assert not await limiter.ping()


async def test_close_closes_the_client(limiter: RedisRateLimiter, fake: FakeRedis) -> None:
    await limiter.close()
    assert fake.closed


async def test_negative_cost_is_a_bug_not_an_outage(limiter: RedisRateLimiter) -> None:
    with pytest.raises(ValueError, match="token cost"):
        await limiter.acquire("ws1", Limits(rpm=5, tpm=100), -1)


PERIOD = "2025-03"


async def test_acquire_with_a_quota_sends_all_four_keys_in_one_call(
    limiter: RedisRateLimiter, fake: FakeRedis
) -> None:
    fake.script.reply = [1, 0, 0, 0, 4, 12000, 90, 6000, 0, 70, 800, 3]  # both counters exist
    quota = Quota(period=PERIOD, token_quota=10**30, spend_cap_micros=None)
    result = await limiter.acquire("ws1", Limits(rpm=5, tpm=100), 10, quota=quota, spend_micros=7)
    assert result.allowed
    assert result.quota_exceeded is None
    assert result.quota == QuotaState(PERIOD, 70, 800, known=True)
    keys = (*bucket_keys("ws1"), *usage_keys("ws1", PERIOD))
    # ARGV: rpm, tpm, cost, tokens, spend, token quota, spend cap
    args = [5, 100, 10, 10, 7, MAX_COUNTER, -1]
    assert fake.script.calls == [(keys, args)]
    assert fake.script.operations == ["acquire_quota"]


async def test_the_quota_gets_the_unclamped_token_count(
    limiter: RedisRateLimiter, fake: FakeRedis
) -> None:
    fake.script.reply = [0, 2, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0]
    quota = Quota(period=PERIOD, token_quota=None, spend_cap_micros=5)
    result = await limiter.acquire("ws1", Limits(rpm=0, tpm=0), 10**12, quota=quota)
    assert result.quota_exceeded is QuotaKind.TOKENS
    assert result.quota == QuotaState(PERIOD, 0, 0, known=False)
    cost, tokens = fake.script.calls[0][1][2], fake.script.calls[0][1][3]
    assert (cost, tokens) == (10**10 + 1, 10**12)


async def test_acquire_without_a_quota_keeps_the_old_call(
    limiter: RedisRateLimiter, fake: FakeRedis
) -> None:
    await limiter.acquire("ws1", Limits(rpm=5, tpm=100), 10, spend_micros=99)
    assert fake.script.calls == [(bucket_keys("ws1"), [5, 100, 10])]
    assert fake.script.operations == ["acquire"]


async def test_record_usage_is_one_call_and_decodes_the_counters(
    limiter: RedisRateLimiter, fake: FakeRedis
) -> None:
    fake.script.reply = [120, 3400, 0]
    state = await limiter.record_usage(
        "ws1", Limits(rpm=5, tpm=100), period=PERIOD, tpm_delta=-(10**9), tokens=20, spend_micros=3
    )
    assert state == QuotaState(PERIOD, 120, 3400, known=False)
    assert state.missing == {QuotaKind.TOKENS, QuotaKind.SPEND}
    [(keys, args)] = fake.script.calls
    assert keys[:3] == (bucket_keys("ws1")[1], *usage_keys("ws1", PERIOD))
    sent_operation(keys, args, "ws1")
    assert args[:-1] == [100, -200, 20, 3, COUNTER_TTL_SECONDS, OPERATION_TTL_SECONDS]
    assert fake.script.operations == ["record"]


async def test_record_usage_says_which_counter_was_missing(
    limiter: RedisRateLimiter, fake: FakeRedis
) -> None:
    fake.script.reply = [120, 3400, 1]  # the token counter existed, the spend counter did not
    state = await limiter.record_usage(
        "ws1", Limits(rpm=5, tpm=100), period=PERIOD, tpm_delta=0, tokens=20, spend_micros=3
    )
    assert not state.known
    assert state.missing == {QuotaKind.SPEND}


async def test_record_usage_with_no_tpm_limit_sends_no_delta(
    limiter: RedisRateLimiter, fake: FakeRedis
) -> None:
    fake.script.reply = [1, 1, 1]
    await limiter.record_usage(
        "ws1", Limits(rpm=5, tpm=0), period=PERIOD, tpm_delta=50, tokens=1, spend_micros=1
    )
    assert fake.script.calls[0][1][:2] == [0, 0]


async def test_seed_usage_is_one_call(limiter: RedisRateLimiter, fake: FakeRedis) -> None:
    fake.script.reply = [1, 0]
    await limiter.seed_usage("ws1", period=PERIOD, tokens=5, spend_micros=10**20)
    args = [5, MAX_COUNTER + 1, COUNTER_TTL_SECONDS]
    assert fake.script.calls == [(usage_keys("ws1", PERIOD), args)]
    assert fake.script.operations == ["seed"]


async def test_the_test_clock_comes_after_the_operation_arguments(
    fake: FakeRedis,
) -> None:
    limiter = ClockedRedisRateLimiter(cast(RedisClient, fake), clock_ms=lambda: 1234)
    fake.script.reply = [1, 1, 1]
    await limiter.record_usage(
        "ws1",
        Limits(rpm=5, tpm=100),
        period=PERIOD,
        tpm_delta=1,
        tokens=1,
        spend_micros=1,
        operation_id="op-1",
    )
    args = [100, 1, 1, 1, COUNTER_TTL_SECONDS, OPERATION_TTL_SECONDS, "op-1", 1234]
    assert fake.script.calls[0][1] == args


async def test_usage_calls_fail_like_acquire(
    limiter: RedisRateLimiter, fake: FakeRedis, registry: CollectorRegistry
) -> None:
    fake.script.error = RedisTimeoutError("slow")
    with pytest.raises(RateLimitUnavailable, match="record"):
        await limiter.record_usage(
            "ws1", Limits(5, 100), period=PERIOD, tpm_delta=1, tokens=1, spend_micros=1
        )
    with pytest.raises(RateLimitUnavailable, match="seed"):
        await limiter.seed_usage("ws1", period=PERIOD, tokens=1, spend_micros=1)
    assert errors(registry, "timeout") == 2
    latency = "authz_ratelimit_redis_seconds_count"
    assert registry.get_sample_value(latency, {"operation": "record"}) == 1
    assert registry.get_sample_value(latency, {"operation": "seed"}) == 1


async def test_bad_usage_inputs_never_reach_redis(
    limiter: RedisRateLimiter, fake: FakeRedis
) -> None:
    with pytest.raises(ValueError, match="YYYY-MM"):
        await limiter.acquire("ws1", Limits(5, 100), 1, quota=Quota("2025-3", None, None))
    with pytest.raises(ValueError, match="YYYY-MM"):
        await limiter.seed_usage("ws1", period="x", tokens=1, spend_micros=1)
    with pytest.raises(ValueError, match="spend"):
        await limiter.record_usage(
            "ws1", Limits(5, 100), period=PERIOD, tpm_delta=0, tokens=0, spend_micros=-1
        )
    assert fake.script.calls == []


async def test_a_short_quota_reply_is_an_error(limiter: RedisRateLimiter, fake: FakeRedis) -> None:
    quota = Quota(period=PERIOD, token_quota=1, spend_cap_micros=1)
    with pytest.raises(ValueError, match="expected 12"):
        await limiter.acquire("ws1", Limits(5, 100), 1, quota=quota)


async def test_cancellation_is_not_contained(limiter: RedisRateLimiter, fake: FakeRedis) -> None:
    fake.script.hang = True
    call = asyncio.ensure_future(limiter.acquire("ws1", Limits(rpm=5, tpm=100), 10))
    await asyncio.sleep(0)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
