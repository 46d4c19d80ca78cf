"""A Redis that dies, hangs or restarts: fast failures, an open circuit, quick recovery.

Every test here starts its own server, because it kills or pauses it.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import CollectorRegistry

from ratelimit.breaker import BreakerState, CircuitBreaker
from ratelimit.limiter import Limits, RateLimitUnavailable
from ratelimit.metrics import RateLimitMetrics, RedisErrorKind
from ratelimit.redis_backend import RedisRateLimiter, connect_redis
from tests.support.clock import FakeClock
from tests.support.redis_servers import RedisServer

pytestmark = pytest.mark.integration

LIMITS = Limits(rpm=100_000, tpm=10_000_000)
PRODUCTION_TIMEOUT_SECONDS = 0.05
COOLDOWN_SECONDS = 0.25
"""The breaker's production cool-down; tests move an injected clock by it, never sleep it."""
RECOVERY_PROBES = 4
"""Recovery "within a second" (README, AUTHZ_REDIS_BREAKER_COOLDOWN_MS): one probe per cool-down."""


def production_breaker(clock: FakeClock[float]) -> CircuitBreaker:
    """The production breaker (3 failures, 0.25 s cool-down) on a hand-moved clock."""
    return CircuitBreaker(failure_threshold=3, cooldown_seconds=COOLDOWN_SECONDS, clock=clock)


async def probes_until_recovered(limiter: RedisRateLimiter, clock: FakeClock[float]) -> int:
    """Let one probe through per cool-down until a call succeeds; how many probes it took.

    The first probe reconnects and reloads the script (NOSCRIPT) in one 50 ms budget; on a
    loaded machine that can miss once. Bounded by probes, not by the wall clock.
    """
    for probe in range(1, RECOVERY_PROBES + 1):
        clock.now += COOLDOWN_SECONDS
        try:
            assert (await limiter.acquire("ws", LIMITS, 1)).allowed
        except RateLimitUnavailable:
            continue
        return probe
    raise AssertionError(f"no recovery within {RECOVERY_PROBES} cool-downs")


def state(limiter: RedisRateLimiter) -> BreakerState:
    return limiter.breaker.state


def errors(registry: CollectorRegistry, kind: str) -> float:
    value = registry.get_sample_value("authz_ratelimit_redis_errors_total", {"kind": kind})
    assert value is not None
    return value


def error_counts(registry: CollectorRegistry) -> dict[str, float]:
    return {kind.value: errors(registry, kind.value) for kind in RedisErrorKind}


async def fill_pool(limiter: RedisRateLimiter, clock: FakeClock[float] | None = None) -> None:
    """Open several pooled connections (all stale after a restart), then make sure one works.

    Cold connects plus the first script load can miss the 50 ms budget on a busy 2-core
    machine; that start-up cost is not what these tests measure. A breaker on `clock` gets a
    cool-down between tries, so misses that open it do not keep it open.
    """
    await asyncio.gather(
        *(limiter.acquire("ws", LIMITS, 1) for _ in range(8)), return_exceptions=True
    )
    started = time.perf_counter()
    while True:
        if clock is not None:
            clock.now += COOLDOWN_SECONDS
        try:
            await limiter.acquire("ws", LIMITS, 1)
            return
        except RateLimitUnavailable:
            assert time.perf_counter() - started < 5.0, "Redis never answered"
            await asyncio.sleep(0.01)


async def test_dead_redis_fails_fast_then_recovers_within_a_second(own_redis: RedisServer) -> None:
    registry = CollectorRegistry()
    clock = FakeClock(0.0)
    # Production defaults throughout: 50 ms timeout, breaker 3 failures / 0.25 s cool-down.
    limiter = RedisRateLimiter(
        connect_redis(own_redis.url, timeout_seconds=PRODUCTION_TIMEOUT_SECONDS),
        breaker=production_breaker(clock),
        metrics=RateLimitMetrics(registry),
    )
    try:
        await fill_pool(limiter, clock)
        before = error_counts(registry)

        own_redis.kill()
        for _ in range(3):
            with pytest.raises(RateLimitUnavailable, match=r"\(connection\)"):
                await limiter.acquire("ws", LIMITS, 1)
        assert state(limiter) is BreakerState.OPEN
        # Fast: each failed on the refused connection itself, none waited for a timeout.
        after = error_counts(registry)
        assert {kind: after[kind] - before[kind] for kind in after} == {
            **dict.fromkeys(after, 0.0),
            RedisErrorKind.CONNECTION.value: 3.0,
        }

        # The clock stands still: every call meets the open circuit and none touches Redis.
        cpu = time.process_time()
        for _ in range(1000):
            with pytest.raises(RateLimitUnavailable, match="circuit is open"):
                await limiter.acquire("ws", LIMITS, 1)
        # Microseconds each: 100 us of this process' own CPU on average (CPU time, so other
        # processes on the machine do not count).
        assert time.process_time() - cpu < 0.1
        assert errors(registry, "circuit_open") == 1000
        assert error_counts(registry)["connection"] == after["connection"]
        assert registry.get_sample_value("authz_ratelimit_circuit_state") == 2

        own_redis.start()  # same port, empty: no data, no scripts loaded
        await probes_until_recovered(limiter, clock)
        assert state(limiter) is BreakerState.CLOSED
        # The script was gone after the restart; redis-py reloaded it on NOSCRIPT.
        for _ in range(20):
            assert (await limiter.acquire("ws", LIMITS, 1)).allowed
    finally:
        await limiter.close()


async def test_a_quick_restart_costs_no_request(own_redis: RedisServer) -> None:
    # What this checks is the retry of stale connections and the NOSCRIPT reload, not speed:
    # 20 concurrent reconnects plus a script load get a budget a busy CI machine can meet.
    client = connect_redis(own_redis.url, timeout_seconds=0.5)
    limiter = RedisRateLimiter(client, timeout_seconds=0.5)
    try:
        await fill_pool(limiter)
        own_redis.restart()
        # Each stale pooled connection fails once and is retried on a fresh one; the lost
        # script is reloaded on NOSCRIPT: all inside the calls themselves.
        results = await asyncio.gather(*(limiter.acquire("ws", LIMITS, 1) for _ in range(20)))
        assert all(result.allowed for result in results)
    finally:
        await limiter.close()


async def test_first_probe_after_redis_returns_succeeds(own_redis: RedisServer) -> None:
    clock = FakeClock(0.0)
    client = connect_redis(own_redis.url, timeout_seconds=PRODUCTION_TIMEOUT_SECONDS)
    limiter = RedisRateLimiter(
        client, timeout_seconds=PRODUCTION_TIMEOUT_SECONDS, breaker=production_breaker(clock)
    )
    try:
        await fill_pool(limiter, clock)
        own_redis.kill()
        for _ in range(3):
            with pytest.raises(RateLimitUnavailable):
                await limiter.acquire("ws", LIMITS, 1)
        assert state(limiter) is BreakerState.OPEN
        own_redis.start()
        with pytest.raises(RateLimitUnavailable, match="circuit is open"):
            await limiter.acquire("ws", LIMITS, 1)
        await probes_until_recovered(limiter, clock)
        assert state(limiter) is BreakerState.CLOSED
    finally:
        await limiter.close()


async def test_hung_redis_times_out_at_the_deadline(own_redis: RedisServer) -> None:
    registry = CollectorRegistry()
    client = connect_redis(own_redis.url, timeout_seconds=PRODUCTION_TIMEOUT_SECONDS)
    limiter = RedisRateLimiter(
        client, timeout_seconds=PRODUCTION_TIMEOUT_SECONDS, metrics=RateLimitMetrics(registry)
    )
    try:
        assert (await limiter.acquire("ws", LIMITS, 1)).allowed
        own_redis.pause()
        try:
            started = time.perf_counter()
            with pytest.raises(RateLimitUnavailable, match=r"\(timeout\)"):
                await limiter.acquire("ws", LIMITS, 1)
            # It waited out the Redis budget (never less) ...
            assert time.perf_counter() - started >= PRODUCTION_TIMEOUT_SECONDS * 0.8
            # ... and that budget, net of this process' own lag, is what ended it: the 1 s
            # wall-clock backstop would have counted it as `overload` instead.
            assert error_counts(registry) == {
                **dict.fromkeys(error_counts(registry), 0.0),
                RedisErrorKind.TIMEOUT.value: 1.0,
            }
            assert not await limiter.ping()
        finally:
            own_redis.resume()
        assert (await limiter.acquire("ws", LIMITS, 1)).allowed
        assert await limiter.ping()
    finally:
        await limiter.close()


async def test_unreachable_redis_at_start_is_unavailable_not_a_crash() -> None:
    from tests.support.redis_servers import free_port

    limiter = RedisRateLimiter(
        connect_redis(
            f"redis://127.0.0.1:{free_port()}/0", timeout_seconds=PRODUCTION_TIMEOUT_SECONDS
        )
    )
    try:
        with pytest.raises(RateLimitUnavailable):
            await limiter.acquire("ws", LIMITS, 1)
        assert not await limiter.ping()
    finally:
        await limiter.close()
