"""The in-process limiter: the bucket maths behind the RateLimiter protocol, bounded memory."""

from __future__ import annotations

import math

import pytest

from ratelimit.limiter import LimitKind, Limits, Quota, QuotaKind, QuotaState
from ratelimit.memory import (
    COUNTER_SWEEP_INTERVAL_MS,
    SWEEP_INTERVAL_MS,
    InMemoryRateLimiter,
    monotonic_ms,
)
from ratelimit.quota import COUNTER_TTL_MS
from tests.support.clock import FakeClock

T0 = 5_000_000


def make() -> tuple[InMemoryRateLimiter, FakeClock[int]]:
    clock = FakeClock(T0)
    return InMemoryRateLimiter(clock_ms=clock), clock


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
    assert denied.retry_after_seconds == 72.0  # 80 - 200: the whole 120 tokens of debt


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
    await limiter.seed_usage("ws", period="2025-01", tokens=1, spend_micros=1)
    assert await limiter.ping()
    await limiter.close()
    assert len(limiter) == 0
    assert limiter.counters_held == 0


def test_default_clock_is_monotonic_milliseconds() -> None:
    first = monotonic_ms()
    assert isinstance(first, int)
    assert monotonic_ms() >= first


PERIOD = "2025-03"
DAY_MS = 24 * 3600 * 1000


async def test_quota_denies_at_the_boundary_and_debits_nothing() -> None:
    limiter, _ = make()
    limits = Limits(rpm=10, tpm=1000)
    quota = Quota(period=PERIOD, token_quota=100, spend_cap_micros=1_000)
    await limiter.record_usage(
        "ws", limits, period=PERIOD, tpm_delta=0, tokens=60, spend_micros=400
    )
    assert (await limiter.acquire("ws", limits, 40, quota=quota, spend_micros=600)).allowed
    over = await limiter.acquire("ws", limits, 41, quota=quota)
    assert over.quota_exceeded is QuotaKind.TOKENS
    assert over.denied_by is None
    assert over.requests.remaining == 9  # only the admitted request was debited
    assert over.tokens.remaining == 960
    spend = await limiter.acquire("ws", limits, 0, quota=quota, spend_micros=601)
    assert spend.quota_exceeded is QuotaKind.SPEND
    assert spend.quota == QuotaState(PERIOD, 60, 400, known=True)


async def test_acquire_only_reads_the_counters() -> None:
    limiter, _ = make()
    quota = Quota(period=PERIOD, token_quota=10, spend_cap_micros=None)
    await limiter.seed_usage("ws", period=PERIOD, tokens=0, spend_micros=0)
    for _ in range(5):
        result = await limiter.acquire("ws", Limits(0, 0), 10, quota=quota, spend_micros=9)
        assert result.allowed
        assert result.quota == QuotaState(PERIOD, 0, 0, known=True)


async def test_without_a_quota_nothing_changes() -> None:
    limiter, _ = make()
    result = await limiter.acquire("ws", Limits(5, 0), 10, spend_micros=10**9)
    assert result.allowed
    assert result.quota is None
    assert result.quota_exceeded is None


async def test_record_usage_adjusts_tpm_and_counts_in_one_step() -> None:
    limiter, _ = make()
    limits = Limits(rpm=0, tpm=100)
    await limiter.acquire("ws", limits, 50)
    first = await limiter.record_usage(
        "ws", limits, period=PERIOD, tpm_delta=-1000, tokens=20, spend_micros=300
    )
    assert first == QuotaState(PERIOD, 20, 300, known=False)  # nothing existed before it
    assert (await limiter.acquire("ws", limits, 0)).tokens.remaining == 100  # refund capped
    second = await limiter.record_usage(
        "ws", limits, period=PERIOD, tpm_delta=250, tokens=5, spend_micros=1
    )
    assert second == QuotaState(PERIOD, 25, 301, known=True)
    denied = await limiter.acquire("ws", limits, 0)
    assert denied.denied_by is LimitKind.TOKENS  # the charge went into debt
    assert denied.retry_after_seconds == 90.0  # 100 - 250: all 150 tokens of it


async def test_record_usage_without_a_tpm_limit_still_counts() -> None:
    limiter, _ = make()
    state = await limiter.record_usage(
        "ws", Limits(5, 0), period=PERIOD, tpm_delta=10, tokens=1, spend_micros=2
    )
    assert state == QuotaState(PERIOD, 1, 2, known=False)
    assert len(limiter) == 0


async def test_periods_and_workspaces_are_separate() -> None:
    limiter, _ = make()
    await limiter.record_usage(
        "a", Limits(0, 0), period=PERIOD, tpm_delta=0, tokens=1, spend_micros=1
    )
    quota = Quota(period="2025-04", token_quota=None, spend_cap_micros=None)
    assert (await limiter.acquire("a", Limits(0, 0), 0, quota=quota)).quota == QuotaState(
        "2025-04", 0, 0, known=False
    )
    other = Quota(period=PERIOD, token_quota=None, spend_cap_micros=None)
    assert (await limiter.acquire("b", Limits(0, 0), 0, quota=other)).quota == QuotaState(
        PERIOD, 0, 0, known=False
    )


async def test_seed_usage_sets_only_absent_counters() -> None:
    limiter, _ = make()
    quota = Quota(period=PERIOD, token_quota=None, spend_cap_micros=None)
    await limiter.seed_usage("ws", period=PERIOD, tokens=70, spend_micros=80)
    assert (await limiter.acquire("ws", Limits(0, 0), 0, quota=quota)).quota == QuotaState(
        PERIOD, 70, 80, known=True
    )
    await limiter.seed_usage("ws", period=PERIOD, tokens=1, spend_micros=1)  # no clobbering
    after = await limiter.record_usage(
        "ws", Limits(0, 0), period=PERIOD, tpm_delta=0, tokens=5, spend_micros=5
    )
    assert after == QuotaState(PERIOD, 75, 85, known=True)


async def test_a_new_process_knows_no_counters() -> None:
    clock = FakeClock(T0)
    first = InMemoryRateLimiter(clock_ms=clock)
    await first.record_usage(
        "ws", Limits(0, 0), period=PERIOD, tpm_delta=0, tokens=5, spend_micros=5
    )
    fresh = InMemoryRateLimiter(clock_ms=clock)
    quota = Quota(period=PERIOD, token_quota=5, spend_cap_micros=None)
    result = await fresh.acquire("ws", Limits(0, 0), 5, quota=quota)
    # Never admitted on a zero: refused, by no allowance, until the counters are seeded.
    assert not result.allowed
    assert result.quota_exceeded is None
    assert result.quota == QuotaState(PERIOD, 0, 0, known=False)
    await fresh.seed_usage("ws", period=PERIOD, tokens=5, spend_micros=5)
    again = await fresh.acquire("ws", Limits(0, 0), 5, quota=quota)
    assert again.quota_exceeded is QuotaKind.TOKENS


async def test_counters_outlive_the_month_and_vanish_forty_days_after_the_last_write() -> None:
    limiter, clock = make()
    quota = Quota(period=PERIOD, token_quota=None, spend_cap_micros=None)
    limits = Limits(rpm=60, tpm=600)
    await limiter.record_usage("ws", limits, period=PERIOD, tpm_delta=0, tokens=9, spend_micros=9)
    assert COUNTER_TTL_MS == 40 * DAY_MS
    clock.now += 31 * DAY_MS  # bucket sweeps and counter sweeps ran meanwhile
    await limiter.acquire("other", limits, 1)
    assert (await limiter.acquire("ws", limits, 0, quota=quota)).quota == QuotaState(
        PERIOD, 9, 9, known=True
    )
    clock.now += 9 * DAY_MS - 1
    assert (await limiter.acquire("ws", limits, 0, quota=quota)).quota == QuotaState(
        PERIOD, 9, 9, known=True
    )
    clock.now += 1
    assert (await limiter.acquire("ws", limits, 0, quota=quota)).quota == QuotaState(
        PERIOD, 0, 0, known=False
    )
    assert limiter.counters_held == 2  # read as gone at once; swept on the next counter sweep
    clock.now += COUNTER_SWEEP_INTERVAL_MS
    await limiter.acquire("other", limits, 0)
    assert limiter.counters_held == 0


async def test_seeding_an_existing_counter_does_not_extend_its_life() -> None:
    limiter, clock = make()
    quota = Quota(period=PERIOD, token_quota=None, spend_cap_micros=None)
    await limiter.seed_usage("ws", period=PERIOD, tokens=3, spend_micros=3)
    clock.now += 30 * DAY_MS
    await limiter.seed_usage("ws", period=PERIOD, tokens=4, spend_micros=4)
    clock.now += 10 * DAY_MS
    assert (await limiter.acquire("ws", Limits(0, 0), 0, quota=quota)).quota == QuotaState(
        PERIOD, 0, 0, known=False
    )


async def test_bad_inputs_are_bugs() -> None:
    limiter, _ = make()
    with pytest.raises(ValueError, match="YYYY-MM"):
        await limiter.record_usage(
            "ws", Limits(0, 0), period="2025-3", tpm_delta=0, tokens=0, spend_micros=0
        )
    with pytest.raises(ValueError, match="YYYY-MM"):
        await limiter.seed_usage("ws", period="march", tokens=0, spend_micros=0)
    with pytest.raises(ValueError, match="tokens"):
        await limiter.record_usage(
            "ws", Limits(0, 0), period=PERIOD, tpm_delta=0, tokens=-1, spend_micros=0
        )
    with pytest.raises(ValueError, match="spend"):
        await limiter.acquire("ws", Limits(0, 0), 0, spend_micros=-1)
    with pytest.raises(ValueError, match="token quota"):
        await limiter.acquire("ws", Limits(0, 0), 0, quota=Quota(PERIOD, -5, None))
