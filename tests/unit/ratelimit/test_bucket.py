"""The pure bucket maths, with time passed in."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ratelimit import bucket
from ratelimit.bucket import UNITS_PER_TOKEN, BucketLevel, LimitDecision
from ratelimit.limiter import LimitKind, Limits

T0 = 1_700_000_000_000


class Buckets:
    """Drives `bucket.acquire` / `bucket.adjust` like a backend would, keeping the state."""

    def __init__(self, limits: Limits) -> None:
        self.limits = bucket.normalise_limits(limits)
        self.requests: BucketLevel | None = None
        self.tokens: BucketLevel | None = None

    def acquire(self, cost: int, now_ms: int) -> LimitDecision:
        outcome = bucket.acquire(
            self.limits,
            bucket.normalise_cost(cost),
            now_ms=now_ms,
            requests=self.requests,
            tokens=self.tokens,
        )
        if outcome.requests is not None:
            self.requests = outcome.requests
        if outcome.tokens is not None:
            self.tokens = outcome.tokens
        return outcome.decision

    def adjust(self, delta: int, now_ms: int) -> None:
        delta = bucket.normalise_delta(delta, self.limits.tpm)
        self.tokens = bucket.adjust(self.limits.tpm, delta, now_ms=now_ms, tokens=self.tokens)


def test_contract_rpm5_burst_of_five_then_sixth_waits_twelve_seconds() -> None:
    buckets = Buckets(Limits(rpm=5, tpm=0))
    for _ in range(5):
        assert buckets.acquire(1, T0).allowed
    denied = buckets.acquire(1, T0).to_result()
    assert not denied.allowed
    assert denied.denied_by is LimitKind.REQUESTS
    assert math.ceil(denied.retry_after_seconds) == 12
    assert denied.requests.remaining == 0
    assert denied.requests.reset_seconds == 60.0


def test_contract_example_holds_when_the_burst_is_spread_over_milliseconds() -> None:
    buckets = Buckets(Limits(rpm=5, tpm=0))
    for i in range(5):
        assert buckets.acquire(1, T0 + i).allowed
    denied = buckets.acquire(1, T0 + 5)
    assert math.ceil(denied.retry_after_ms / 1000) == 12


def test_refill_is_continuous_at_limit_per_minute() -> None:
    buckets = Buckets(Limits(rpm=60, tpm=0))
    for _ in range(60):
        assert buckets.acquire(1, T0).allowed
    assert not buckets.acquire(1, T0).allowed
    assert not buckets.acquire(1, T0 + 999).allowed
    assert buckets.acquire(1, T0 + 1000).allowed
    assert not buckets.acquire(1, T0 + 1000).allowed


def test_retry_after_is_exact_for_the_request() -> None:
    buckets = Buckets(Limits(rpm=0, tpm=600))  # 10 tokens per second
    assert buckets.acquire(600, T0).allowed
    denied = buckets.acquire(25, T0)
    assert denied.denied_by is LimitKind.TOKENS
    assert denied.retry_after_ms == 2500
    assert buckets.acquire(25, T0 + 2499).allowed is False
    assert buckets.acquire(25, T0 + 2500).allowed


def test_new_bucket_is_full_and_reports_remaining_and_reset() -> None:
    decision = Buckets(Limits(rpm=10, tpm=1000)).acquire(100, T0)
    assert decision.allowed
    assert decision.requests == bucket.BucketReport(limit=10, remaining=9, reset_ms=6000)
    assert decision.tokens == bucket.BucketReport(limit=1000, remaining=900, reset_ms=6000)


def test_reset_is_time_until_full_again() -> None:
    buckets = Buckets(Limits(rpm=3, tpm=0))
    buckets.acquire(1, T0)
    second = buckets.acquire(1, T0 + 5000)
    # After the first: 20 s to full. 5 s later 15 s remain, plus 20 s for the second request.
    assert second.requests.reset_ms == 35_000


def test_all_or_nothing_when_tokens_are_short() -> None:
    buckets = Buckets(Limits(rpm=10, tpm=100))
    assert buckets.acquire(90, T0).allowed
    denied = buckets.acquire(20, T0)
    assert not denied.allowed
    assert denied.denied_by is LimitKind.TOKENS
    assert denied.requests.remaining == 9  # the request bucket was not debited
    assert buckets.acquire(10, T0).requests.remaining == 8


def test_all_or_nothing_when_requests_are_short() -> None:
    buckets = Buckets(Limits(rpm=1, tpm=100))
    assert buckets.acquire(10, T0).allowed
    denied = buckets.acquire(10, T0)
    assert denied.denied_by is LimitKind.REQUESTS
    assert denied.tokens.remaining == 90  # the token bucket was not debited


def test_both_short_reports_requests_and_waits_for_both() -> None:
    buckets = Buckets(Limits(rpm=1, tpm=60))  # 1 request and 1 token per second
    assert buckets.acquire(60, T0).allowed
    denied = buckets.acquire(30, T0)
    assert denied.denied_by is LimitKind.REQUESTS
    assert denied.retry_after_ms == 60_000  # the request bucket needs 60 s, the tokens 30 s
    in_debt = Buckets(Limits(rpm=1, tpm=1))
    in_debt.acquire(1, T0)
    in_debt.adjust(1, T0)  # tokens at -1: 120 s until one token fits
    both = in_debt.acquire(1, T0)
    assert both.denied_by is LimitKind.REQUESTS  # requests first, though tokens wait longer
    assert both.retry_after_ms == 120_000


def test_too_large_is_denied_by_tokens_without_debit() -> None:
    buckets = Buckets(Limits(rpm=0, tpm=100))
    denied = buckets.acquire(101, T0)
    assert not denied.allowed
    assert denied.too_large
    assert denied.denied_by is LimitKind.TOKENS
    assert denied.retry_after_ms == 0
    assert buckets.acquire(100, T0).allowed


def test_too_large_wins_over_a_short_request_bucket() -> None:
    buckets = Buckets(Limits(rpm=1, tpm=100))
    buckets.acquire(1, T0)
    denied = buckets.acquire(1000, T0)
    assert denied.too_large
    assert denied.denied_by is LimitKind.TOKENS


def test_cost_equal_to_capacity_is_not_too_large() -> None:
    assert Buckets(Limits(rpm=0, tpm=100)).acquire(100, T0).allowed


def test_unlimited_buckets_always_have_room_and_report_zeros() -> None:
    buckets = Buckets(Limits(rpm=0, tpm=0))
    for _ in range(1000):
        decision = buckets.acquire(10**12, T0)
        assert decision.allowed
    result = decision.to_result()
    assert result.requests.limit == result.requests.remaining == 0
    assert result.requests.reset_seconds == 0
    assert result.tokens.limit == result.tokens.remaining == 0
    assert buckets.requests is None
    assert buckets.tokens is None


def test_one_unlimited_bucket_leaves_the_other_in_charge() -> None:
    buckets = Buckets(Limits(rpm=0, tpm=10))
    assert buckets.acquire(10, T0).allowed
    denied = buckets.acquire(1, T0)
    assert denied.denied_by is LimitKind.TOKENS
    assert denied.requests == bucket.BucketReport(0, 0, 0)


def test_zero_cost_needs_no_tokens_but_a_request() -> None:
    buckets = Buckets(Limits(rpm=1, tpm=10))
    assert buckets.acquire(0, T0).tokens.remaining == 10
    assert buckets.acquire(0, T0).denied_by is LimitKind.REQUESTS


def test_refund_never_exceeds_capacity() -> None:
    buckets = Buckets(Limits(rpm=0, tpm=100))
    buckets.acquire(50, T0)
    buckets.adjust(-1000, T0)
    assert buckets.tokens == BucketLevel(100 * UNITS_PER_TOKEN, T0)


def test_charge_can_go_negative_and_is_paid_back_by_waiting() -> None:
    buckets = Buckets(Limits(rpm=0, tpm=60))  # 1 token per second
    assert buckets.acquire(60, T0).allowed
    buckets.adjust(30, T0)  # used 30 more than reserved: level -30 tokens
    denied = buckets.acquire(0, T0)
    assert denied.denied_by is LimitKind.TOKENS
    assert denied.retry_after_ms == 30_000
    assert denied.tokens.remaining == 0
    assert denied.tokens.reset_ms == 90_000
    assert buckets.acquire(0, T0 + 30_000).allowed


def test_debt_is_carried_whole_past_one_capacity() -> None:
    buckets = Buckets(Limits(rpm=0, tpm=60))
    buckets.adjust(10**9, T0)
    assert buckets.tokens == BucketLevel((60 - 10**9) * UNITS_PER_TOKEN, T0)
    denied = buckets.acquire(1, T0)
    assert denied.retry_after_ms == (10**9 - 60 + 1) * 1000  # 1 token a second


def test_adjust_of_an_unlimited_bucket_keeps_no_state() -> None:
    buckets = Buckets(Limits(rpm=5, tpm=0))
    buckets.adjust(100, T0)
    assert buckets.tokens is None


def test_clock_going_backwards_grants_nothing_and_keeps_the_later_time() -> None:
    buckets = Buckets(Limits(rpm=60, tpm=0))
    for _ in range(60):
        buckets.acquire(1, T0)
    assert not buckets.acquire(1, T0 - 10_000).allowed
    assert buckets.requests == BucketLevel(0, T0)
    assert buckets.acquire(1, T0 + 1000).allowed


def test_lowering_a_limit_clamps_the_stored_level() -> None:
    buckets = Buckets(Limits(rpm=100, tpm=0))
    buckets.acquire(1, T0)
    buckets.limits = Limits(rpm=10, tpm=0)
    assert buckets.acquire(1, T0).requests.remaining == 9


def test_limits_are_clamped_to_the_exact_range() -> None:
    assert bucket.normalise_limits(Limits(rpm=-5, tpm=10**20)) == Limits(0, bucket.MAX_LIMIT)
    assert bucket.normalise_cost(10**30) == bucket.MAX_LIMIT + 1
    with pytest.raises(ValueError, match="token cost"):
        bucket.normalise_cost(-1)
    assert bucket.normalise_delta(10**9, 10) == 10**9
    assert bucket.normalise_delta(10**30, 10) == bucket.MAX_CHARGE
    assert bucket.normalise_delta(-(10**9), 10) == -20


def test_wire_round_trip() -> None:
    limits = Limits(rpm=5, tpm=100)
    buckets = Buckets(limits)
    for cost in (10, 200, 50, 50, 0):
        decision = buckets.acquire(cost, T0)
        assert LimitDecision.from_wire(decision.to_wire(), limits) == decision


def test_from_wire_rejects_a_short_reply() -> None:
    with pytest.raises(ValueError, match="expected 8"):
        LimitDecision.from_wire((1, 0), Limits(1, 1))


@settings(max_examples=200, deadline=None)
@given(
    rpm=st.integers(0, 1000),
    tpm=st.integers(0, 10**6),
    ops=st.lists(st.tuples(st.integers(0, 2 * 10**6), st.integers(0, 120_000)), max_size=30),
)
def test_invariants(rpm: int, tpm: int, ops: list[tuple[int, int]]) -> None:
    buckets = Buckets(Limits(rpm=rpm, tpm=tpm))
    now = T0
    for cost, step in ops:
        now += step
        decision = buckets.acquire(cost, now)
        assert decision.allowed == (decision.denied_by is None)
        assert decision.retry_after_ms >= 0
        assert 0 <= decision.requests.remaining <= rpm
        assert 0 <= decision.tokens.remaining <= tpm
        assert 0 <= decision.requests.reset_ms <= 60_000
        if decision.too_large:
            assert cost > tpm > 0
        elif not decision.allowed:
            assert decision.retry_after_ms > 0
            # Waiting exactly retry_after makes the same request fit.
            retry = bucket.acquire(
                buckets.limits,
                cost,
                now_ms=now + decision.retry_after_ms,
                requests=buckets.requests,
                tokens=buckets.tokens,
            )
            assert retry.decision.allowed
