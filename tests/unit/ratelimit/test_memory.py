"""The in-process limiter: the bucket maths behind the RateLimiter protocol, bounded memory."""

from __future__ import annotations

import math

from ratelimit.limiter import LimitKind, Limits, RateLimiter
from ratelimit.memory import SWEEP_INTERVAL_MS, InMemoryRateLimiter, monotonic_ms

T0 = 5_000_000


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


def make() -> tuple[InMemoryRateLimiter, FakeClock]:
    clock = FakeClock()
    return InMemoryRateLimiter(clock_ms=clock), clock


def test_implements_the_protocol() -> None:
    limiter: RateLimiter = InMemoryRateLimiter()
    assert limiter is not None


async def test_contract_example() -> None:
    limiter, _ = make()
    limits = Limits(rpm=5, tpm=0)
    for _ in range(5):
        assert (await limiter.acquire("ws", limits, 10)).allowed
    denied = await limiter.acquire("ws", limits, 10)
    assert denied.denied_by is LimitKind.REQUESTS
    assert math.ceil(denied.retry_after_seconds) == 12


async def test_workspaces_are_independent() -> None:
    limiter, _ = make()
    limits = Limits(rpm=1, tpm=0)
    assert (await limiter.acquire("a", limits, 0)).allowed
    assert (await limiter.acquire("b", limits, 0)).allowed
    assert not (await limiter.acquire("a", limits, 0)).allowed


async def test_refill_follows_the_injected_clock() -> None:
    limiter, clock = make()
    limits = Limits(rpm=0, tpm=60)
    assert (await limiter.acquire("ws", limits, 60)).allowed
    assert not (await limiter.acquire("ws", limits, 1)).allowed
    clock.now += 1000
    assert (await limiter.acquire("ws", limits, 1)).allowed


async def test_adjust_charges_and_refunds() -> None:
    limiter, _ = make()
    limits = Limits(rpm=0, tpm=100)
    await limiter.acquire("ws", limits, 50)
    await limiter.adjust_tokens("ws", limits, -30)  # used 30 fewer than reserved
    assert (await limiter.acquire("ws", limits, 0)).tokens.remaining == 80
    await limiter.adjust_tokens("ws", limits, 200)  # used far more
    denied = await limiter.acquire("ws", limits, 0)
    assert denied.denied_by is LimitKind.TOKENS
    assert denied.retry_after_seconds == 60.0  # a full capacity of debt


async def test_full_idle_buckets_are_forgotten() -> None:
    limiter, clock = make()
    limits = Limits(rpm=60, tpm=600)
    for i in range(100):
        await limiter.acquire(f"ws-{i}", limits, 10)
    assert len(limiter) == 200
    clock.now += 999  # one request refills in 1 s, one request's 10 tokens in 1 s
    await limiter.acquire("other", limits, 10)
    assert len(limiter) == 202
    clock.now += max(1, SWEEP_INTERVAL_MS - 999)
    await limiter.acquire("other", limits, 10)
    assert len(limiter) == 2


async def test_a_forgotten_bucket_is_a_full_bucket() -> None:
    limiter, clock = make()
    limits = Limits(rpm=2, tpm=0)
    await limiter.acquire("ws", limits, 0)
    clock.now += 60_000
    await limiter.acquire("other", limits, 0)  # triggers the sweep
    assert (await limiter.acquire("ws", limits, 0)).requests.remaining == 1


async def test_unlimited_keeps_no_state() -> None:
    limiter, _ = make()
    for _ in range(10):
        assert (await limiter.acquire("ws", Limits(0, 0), 10**15)).allowed
    await limiter.adjust_tokens("ws", Limits(0, 0), 5)
    assert len(limiter) == 0


async def test_ping_and_close() -> None:
    limiter, _ = make()
    await limiter.acquire("ws", Limits(1, 1), 1)
    assert await limiter.ping()
    await limiter.close()
    assert len(limiter) == 0


def test_default_clock_is_monotonic_milliseconds() -> None:
    first = monotonic_ms()
    assert isinstance(first, int)
    assert monotonic_ms() >= first
