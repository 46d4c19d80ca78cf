"""A busy sidecar with a healthy Redis: overload shows up as queueing, never as Redis failure.

A burst of concurrent Checks, or a CPU-bound event loop, leaves Redis replies waiting in the
socket. Those must not time out, fail or open the breaker (issue: 503s with healthy backends).
Production settings throughout: 50 ms timeout, breaker 3 failures / 0.25 s, 32 connections.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import CollectorRegistry

from ratelimit.breaker import BreakerState
from ratelimit.limiter import Limits, RateLimitUnavailable
from ratelimit.metrics import RateLimitMetrics, RedisErrorKind
from ratelimit.redis_backend import RedisRateLimiter, connect_redis
from tests.support.redis_servers import RedisServer

pytestmark = pytest.mark.integration

LIMITS = Limits(rpm=10_000_000, tpm=10_000_000)
BURST = 500
PRODUCTION_TIMEOUT_SECONDS = 0.05


def production_limiter(url: str, registry: CollectorRegistry) -> RedisRateLimiter:
    client = connect_redis(url, timeout_seconds=PRODUCTION_TIMEOUT_SECONDS)
    return RedisRateLimiter(
        client, timeout_seconds=PRODUCTION_TIMEOUT_SECONDS, metrics=RateLimitMetrics(registry)
    )


def error_counts(registry: CollectorRegistry) -> dict[str, float]:
    return {
        kind.value: registry.get_sample_value(
            "authz_ratelimit_redis_errors_total", {"kind": kind.value}
        )
        or 0.0
        for kind in RedisErrorKind
    }


async def burst(limiter: RedisRateLimiter, n: int) -> list[str]:
    async def one(index: int) -> str:
        try:
            result = await limiter.acquire(f"ws-{index % 50}", LIMITS, 10)
        except RateLimitUnavailable as exc:
            return str(exc)
        return "allowed" if result.allowed else "denied"

    return await asyncio.gather(*(one(i) for i in range(n)))


async def hog_cpu(stop: asyncio.Event, busy_seconds: float, idle_seconds: float = 0.0) -> None:
    """Until stopped: block the event loop with `busy_seconds` of pure CPU, then let it run for
    `idle_seconds` (one turn at least)."""
    while not stop.is_set():
        end = time.perf_counter() + busy_seconds
        while time.perf_counter() < end:
            pass
        await asyncio.sleep(idle_seconds)


async def test_a_burst_of_500_gets_no_failure(own_redis: RedisServer) -> None:
    registry = CollectorRegistry()
    limiter = production_limiter(own_redis.url, registry)
    try:
        assert (await limiter.acquire("warm-up", LIMITS, 1)).allowed  # loads the script
        for _ in range(3):
            outcomes = await burst(limiter, BURST)
            assert [o for o in outcomes if o != "allowed"] == []
        assert limiter.breaker.state is BreakerState.CLOSED
        assert error_counts(registry) == {kind.value: 0.0 for kind in RedisErrorKind}
    finally:
        await limiter.close()


async def test_a_burst_on_a_cpu_saturated_loop_gets_no_failure(own_redis: RedisServer) -> None:
    registry = CollectorRegistry()
    limiter = production_limiter(own_redis.url, registry)
    stop = asyncio.Event()
    try:
        assert (await limiter.acquire("warm-up", LIMITS, 1)).allowed
        # The loop stalls for 60 ms (longer than the whole Redis timeout) every 200 ms: replies
        # wait in the socket past 50 ms, as on a saturated sidecar.
        hog = asyncio.create_task(hog_cpu(stop, 0.06, 0.14))
        outcomes = await burst(limiter, BURST)
        stop.set()
        await hog
        assert [o for o in outcomes if o != "allowed"] == []
        assert limiter.breaker.state is BreakerState.CLOSED
        assert error_counts(registry) == {kind.value: 0.0 for kind in RedisErrorKind}
    finally:
        stop.set()
        await limiter.close()


async def test_a_hung_redis_on_a_busy_loop_still_fails_and_opens_the_breaker(
    own_redis: RedisServer,
) -> None:
    registry = CollectorRegistry()
    limiter = production_limiter(own_redis.url, registry)
    stop = asyncio.Event()
    try:
        assert (await limiter.acquire("warm-up", LIMITS, 1)).allowed
        own_redis.pause()
        try:
            # Busy, but not saturated: 5 ms slices.
            hog = asyncio.create_task(hog_cpu(stop, 0.005))
            for _ in range(3):
                with pytest.raises(RateLimitUnavailable, match=r"\(timeout\)"):
                    await limiter.acquire("ws", LIMITS, 1)
            stop.set()
            await hog
            assert limiter.breaker.state is BreakerState.OPEN
            # Each ended at its Redis budget, net of the hog's lag: the 1 s wall-clock backstop
            # would have counted `overload` (and spared the breaker).
            assert error_counts(registry) == {
                **{kind.value: 0.0 for kind in RedisErrorKind},
                RedisErrorKind.TIMEOUT.value: 3.0,
            }
        finally:
            own_redis.resume()
    finally:
        stop.set()
        await limiter.close()
