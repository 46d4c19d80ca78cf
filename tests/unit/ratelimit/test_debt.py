"""Overuse is carried as debt, not forgiven (issue 17, finding 6): the in-process twin.

The Redis twin runs the same workloads in tests/integration/ratelimit/test_debt_parity.py.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings

from ratelimit import bucket
from ratelimit.bucket import MAX_CHARGE, MAX_DEBT, MAX_LIMIT, UNITS_PER_TOKEN, BucketLevel
from ratelimit.durations import format_go_duration, retry_after_header
from ratelimit.limiter import LimitKind, Limits, QuotaState
from ratelimit.memory import InMemoryRateLimiter
from tests.support.clock import FakeClock
from tests.support.token_debt import PERIOD, WINDOW_MS, Ledger, Workload, drive, workloads

T0 = 5_000_000

# The issue's case: TPM 2000; an 84-byte body with max_tokens 40 reserves 21 + 40 tokens, and
# the upstream answers 100 000 completion tokens. With the old clamp at minus one bucket the
# workspace was admitted at 0, 63 and 125 s: 3 x 100 021 = 300 063 tokens in about 2 minutes.
TPM = 2000
ESTIMATE = 61
USAGE = 100_021


@settings(max_examples=300, deadline=None)
@given(workload=workloads())
async def test_tokens_over_any_window_ending_at_an_admission_stay_within_limit_plus_a_bucket(
    workload: Workload,
) -> None:
    clock = FakeClock(T0)
    await drive(InMemoryRateLimiter(clock_ms=clock), clock, workload)


def test_the_bound_rejects_the_forgiving_history_of_the_issue() -> None:
    ledger = Ledger(TPM)
    ledger.admitted(0, ESTIMATE)
    ledger.reported(1_000, USAGE - ESTIMATE)
    with pytest.raises(AssertionError, match="more than TPM 2000 allows"):
        ledger.admitted(63_000, ESTIMATE)


async def test_the_second_request_waits_until_the_debt_is_paid() -> None:
    clock = FakeClock(T0)
    limiter = InMemoryRateLimiter(clock_ms=clock)
    limits = Limits(rpm=0, tpm=TPM)
    ledger = Ledger(TPM)

    assert (await limiter.acquire("ws", limits, ESTIMATE)).allowed
    ledger.admitted(clock.now - T0, ESTIMATE)
    clock.now += 1_000  # the response ends and its usage is reconciled
    state = await limiter.record_usage(
        "ws", limits, period=PERIOD, tpm_delta=USAGE - ESTIMATE, tokens=USAGE, spend_micros=7
    )
    ledger.reported(clock.now - T0, USAGE - ESTIMATE)
    # The monthly counters count the usage whole, as before.
    assert state == QuotaState(PERIOD, USAGE, 7, known=False)

    for at_ms in (63_000, 125_000):
        clock.now = T0 + at_ms
        denied = await limiter.acquire("ws", limits, ESTIMATE)
        assert denied.denied_by is LimitKind.TOKENS
        assert not denied.too_large
        assert denied.tokens.remaining == 0
        # The debt of 100 021 - 2000 tokens, less what refilled since t = 0, plus this request's
        # 61 tokens, at 2000 a minute (30 ms a token). The reset fills the whole bucket.
        assert round(denied.retry_after_seconds * 1000) == (USAGE - TPM + ESTIMATE) * 30 - at_ms
        assert round(denied.tokens.reset_seconds * 1000) == USAGE * 30 - at_ms
    assert retry_after_header(denied.retry_after_seconds) == "2818"  # 46m57.46s at t = 125 s
    assert format_go_duration(denied.tokens.reset_seconds) == "47m55.63s"

    paid_at = clock.now + round(denied.retry_after_seconds * 1000)
    clock.now = paid_at - 1
    assert not (await limiter.acquire("ws", limits, ESTIMATE)).allowed
    clock.now = paid_at
    assert (await limiter.acquire("ws", limits, ESTIMATE)).allowed
    ledger.admitted(clock.now - T0, ESTIMATE)
    # Not one 10-minute window holds more than TPM x 10 + a bucket, once the debt is paid.
    assert ledger.in_window(paid_at - T0 - WINDOW_MS, paid_at - T0) == ESTIMATE


def test_a_charge_is_carried_whole_far_past_one_bucket() -> None:
    assert bucket.normalise_delta(10**9, 10) == 10**9
    state = bucket.adjust(60, 10**6, now_ms=T0, tokens=None)
    assert state == BucketLevel((60 - 10**6) * UNITS_PER_TOKEN, T0)
    paid = bucket.ms_to_reach(60, state.level, 0)
    assert paid == (10**6 - 60) * 1000  # 1 token a second


def test_refunds_stay_bounded_so_a_bogus_one_cannot_wipe_a_debt() -> None:
    assert bucket.normalise_delta(-(10**9), 10) == -20
    in_debt = bucket.adjust(10, 1000, now_ms=T0, tokens=None)
    refunded = bucket.adjust(10, bucket.normalise_delta(-(10**9), 10), now_ms=T0, tokens=in_debt)
    assert refunded == BucketLevel((10 - 1000 + 20) * UNITS_PER_TOKEN, T0)


def test_only_the_exactness_bounds_cut_a_charge_or_a_debt() -> None:
    assert bucket.normalise_delta(10**30, 10) == MAX_CHARGE
    state: BucketLevel | None = None
    for _ in range(MAX_DEBT // MAX_CHARGE + 2):
        state = bucket.adjust(5, MAX_CHARGE, now_ms=T0, tokens=state)
    assert state == BucketLevel(-MAX_DEBT * UNITS_PER_TOKEN, T0)


def test_the_deepest_debt_at_the_highest_limit_stays_exact_in_doubles() -> None:
    # Every intermediate value the Lua twin forms: the level less one more charge, and the
    # distance from the deepest debt to a full bucket at MAX_LIMIT.
    assert (MAX_DEBT + MAX_CHARGE) * UNITS_PER_TOKEN < 2**53
    assert (MAX_LIMIT + MAX_DEBT) * UNITS_PER_TOKEN + MAX_LIMIT < 2**53
    deepest = BucketLevel(-MAX_DEBT * UNITS_PER_TOKEN, T0)
    state = bucket.adjust(MAX_LIMIT, MAX_CHARGE, now_ms=T0, tokens=deepest)
    assert state == deepest
    assert bucket.ttl_ms(MAX_LIMIT, deepest.level) < 2**53
    assert bucket.ttl_ms(1, deepest.level) < 2**53
