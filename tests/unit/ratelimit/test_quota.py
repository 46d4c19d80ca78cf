"""The pure quota maths: boundaries, order against the buckets, counters, normalisation."""

from __future__ import annotations

import calendar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ratelimit import bucket, quota
from ratelimit.bucket import BucketLevel, BucketReport, LimitDecision
from ratelimit.limiter import LimitKind, Limits, Quota, QuotaKind, QuotaState
from ratelimit.quota import MAX_COUNTER, Counters

T0 = 1_700_000_000_000
PERIOD = "2025-03"
LIMITS = Limits(rpm=10, tpm=1000)


def check(
    q: Quota,
    counters: Counters,
    *,
    tokens: int = 0,
    spend: int = 0,
    limits: Limits = LIMITS,
    requests: BucketLevel | None = None,
    token_bucket: BucketLevel | None = None,
    now_ms: int = T0,
) -> bucket.Acquisition:
    """`quota.acquire` with normalised inputs, as a backend calls it."""
    limits = bucket.normalise_limits(limits)
    return quota.acquire(
        limits,
        bucket.normalise_cost(tokens),
        now_ms=now_ms,
        requests=requests,
        tokens=token_bucket,
        quota=quota.normalise_quota(q),
        counters=counters,
        usage_tokens=quota.normalise_amount(tokens, "tokens"),
        usage_spend=quota.normalise_amount(spend, "spend"),
    )


def tokens_quota(limit: int | None) -> Quota:
    return Quota(period=PERIOD, token_quota=limit, spend_cap_micros=None)


def spend_cap(limit: int | None) -> Quota:
    return Quota(period=PERIOD, token_quota=None, spend_cap_micros=limit)


def test_exactly_at_the_token_quota_is_allowed_one_over_is_denied() -> None:
    used = Counters(tokens=900, spend_micros=0)
    assert check(tokens_quota(1000), used, tokens=100).decision.allowed
    denied = check(tokens_quota(1000), used, tokens=101).decision
    assert not denied.allowed
    assert denied.quota_exceeded is QuotaKind.TOKENS
    assert denied.denied_by is None
    assert not denied.too_large
    assert denied.retry_after_ms == 0


def test_exactly_at_the_spend_cap_is_allowed_one_micro_over_is_denied() -> None:
    used = Counters(tokens=0, spend_micros=4_999_000)
    assert check(spend_cap(5_000_000), used, spend=1_000).decision.allowed
    denied = check(spend_cap(5_000_000), used, spend=1_001).decision
    assert denied.quota_exceeded is QuotaKind.SPEND
    assert denied.denied_by is None


def test_a_used_up_quota_denies_even_a_request_that_adds_nothing() -> None:
    # CONTRACT §2: "quota ... for the period used up" is a 429, whatever the request costs.
    used = Counters(tokens=1000, spend_micros=3)
    q = Quota(period=PERIOD, token_quota=1000, spend_cap_micros=5)
    assert check(q, used).decision.quota_exceeded is QuotaKind.TOKENS
    assert check(q, used, tokens=1).decision.quota_exceeded is QuotaKind.TOKENS
    spent = Counters(tokens=0, spend_micros=5)
    assert check(q, spent).decision.quota_exceeded is QuotaKind.SPEND
    # One short of the quota: a free request, or one that lands exactly on it, still passes.
    almost = Counters(tokens=999, spend_micros=4)
    assert check(q, almost).decision.allowed
    assert check(q, almost, tokens=1, spend=1).decision.allowed


def test_zero_is_a_real_allowance_not_unlimited() -> None:
    empty = Counters()
    assert check(tokens_quota(0), empty, tokens=0).decision.quota_exceeded is QuotaKind.TOKENS
    assert check(tokens_quota(0), empty, tokens=1).decision.quota_exceeded is QuotaKind.TOKENS
    assert check(spend_cap(0), empty, spend=0).decision.quota_exceeded is QuotaKind.SPEND


def test_none_axes_are_unlimited() -> None:
    huge = Counters(tokens=MAX_COUNTER, spend_micros=MAX_COUNTER)
    unlimited = Quota(period=PERIOD, token_quota=None, spend_cap_micros=None)
    decision = check(unlimited, huge, tokens=500, spend=10**18).decision
    assert decision.allowed
    assert decision.quota_exceeded is None
    assert decision.quota == QuotaState(PERIOD, MAX_COUNTER, MAX_COUNTER, known=True)
    # Only the spend axis limited: any number of tokens passes it.
    assert check(spend_cap(10), huge, tokens=10**12, limits=Limits(0, 0)).decision.quota_exceeded


def test_tokens_are_reported_before_spend_when_both_are_over() -> None:
    q = Quota(period=PERIOD, token_quota=10, spend_cap_micros=10)
    assert check(q, Counters(10, 10), tokens=1, spend=1).decision.quota_exceeded is QuotaKind.TOKENS


def test_the_quota_is_checked_before_the_buckets_and_debits_nothing() -> None:
    # The request bucket is empty and the cost is too large for TPM: the quota still decides.
    requests = BucketLevel(level=0, updated_ms=T0)
    outcome = check(
        tokens_quota(5), Counters(0, 0), tokens=5000, requests=requests, now_ms=T0 + 3000
    )
    assert outcome.decision.quota_exceeded is QuotaKind.TOKENS
    assert outcome.decision.denied_by is None
    assert not outcome.decision.too_large
    assert outcome.requests is None  # nothing is stored: no bucket debited
    assert outcome.tokens is None
    # The buckets are reported as they stand now (refilled for 3 s), without a debit.
    assert outcome.decision.requests == BucketReport(limit=10, remaining=0, reset_ms=57_000)
    assert outcome.decision.tokens == BucketReport(limit=1000, remaining=1000, reset_ms=0)


def test_within_the_quota_the_buckets_decide_exactly_as_without_it() -> None:
    requests = BucketLevel(level=0, updated_ms=T0)
    outcome = check(tokens_quota(100), Counters(0, 0), tokens=10, requests=requests)
    plain = bucket.acquire(
        bucket.normalise_limits(LIMITS), 10, now_ms=T0, requests=requests, tokens=None
    )
    assert outcome.decision.denied_by is LimitKind.REQUESTS
    assert outcome.decision.quota_exceeded is None
    assert outcome.decision.quota == QuotaState(PERIOD, 0, 0, known=True)
    assert outcome.decision == LimitDecision(
        allowed=plain.decision.allowed,
        denied_by=plain.decision.denied_by,
        too_large=plain.decision.too_large,
        retry_after_ms=plain.decision.retry_after_ms,
        requests=plain.decision.requests,
        tokens=plain.decision.tokens,
        quota=QuotaState(PERIOD, 0, 0, known=True),
    )
    assert (outcome.requests, outcome.tokens) == (plain.requests, plain.tokens)


@pytest.mark.parametrize("counters", [Counters(), Counters(tokens=0), Counters(spend_micros=0)])
def test_a_missing_counter_never_admits_and_debits_nothing(counters: Counters) -> None:
    outcome = check(tokens_quota(100), counters, tokens=10)
    assert not outcome.decision.allowed
    assert outcome.decision.quota_exceeded is None
    assert outcome.decision.denied_by is None
    assert outcome.decision.quota == counters.state(PERIOD)
    assert (outcome.requests, outcome.tokens) == (None, None)


def test_a_surviving_counter_over_the_quota_still_denies_by_it() -> None:
    outcome = check(tokens_quota(100), Counters(tokens=100), tokens=1)
    assert outcome.decision.quota_exceeded is QuotaKind.TOKENS


def test_the_quota_check_does_not_count() -> None:
    counters = Counters(tokens=7, spend_micros=3)
    outcome = check(tokens_quota(100), counters, tokens=50, spend=50)
    assert outcome.decision.allowed
    assert outcome.decision.quota == QuotaState(PERIOD, 7, 3, known=True)


def test_known_needs_both_counters() -> None:
    assert not Counters().known
    assert not Counters(tokens=5).known
    assert not Counters(spend_micros=5).known
    assert Counters(tokens=0, spend_micros=0).known
    assert Counters(tokens=5).state(PERIOD) == QuotaState(PERIOD, 5, 0, known=False)


def test_record_creates_adds_and_saturates() -> None:
    assert quota.record(Counters(), 0, 0) == Counters(0, 0)
    assert quota.record(Counters(tokens=5), 10, 20) == Counters(15, 20)
    assert quota.record(Counters(MAX_COUNTER - 1, 0), 5, MAX_COUNTER + 1) == Counters(
        MAX_COUNTER, MAX_COUNTER
    )


def test_seed_sets_only_missing_counters() -> None:
    assert quota.seed(Counters(), 10, 20) == Counters(10, 20)
    assert quota.seed(Counters(1, 2), 10, 20) == Counters(1, 2)
    assert quota.seed(Counters(tokens=1), 10, 20) == Counters(1, 20)
    assert quota.seed(Counters(spend_micros=0), 10, 20) == Counters(10, 0)
    assert quota.seed(Counters(), MAX_COUNTER + 1, 0) == Counters(MAX_COUNTER, 0)


def test_normalise_quota_clamps_and_rejects() -> None:
    big = Quota(period=PERIOD, token_quota=10**30, spend_cap_micros=None)
    assert quota.normalise_quota(big) == Quota(PERIOD, MAX_COUNTER, None)
    with pytest.raises(ValueError, match="token quota"):
        quota.normalise_quota(Quota(PERIOD, -1, None))
    with pytest.raises(ValueError, match="spend cap"):
        quota.normalise_quota(Quota(PERIOD, None, -1))
    with pytest.raises(ValueError, match="spend"):
        quota.normalise_amount(-1, "spend")
    assert quota.normalise_amount(10**30, "tokens") == MAX_COUNTER + 1
    assert quota.to_wire_limit(None) == quota.NO_LIMIT
    assert quota.to_wire_limit(0) == 0


@pytest.mark.parametrize("period", ["2025-1", "2025-13", "2025-00", "25-01", "2025-01x", "{x}"])
def test_bad_periods_are_rejected(period: str) -> None:
    with pytest.raises(ValueError, match="YYYY-MM"):
        quota.validate_period(period)
    with pytest.raises(ValueError, match="YYYY-MM"):
        quota.normalise_quota(Quota(period, None, None))


def test_month_period_is_the_utc_calendar_month() -> None:
    last_second_of_january = calendar.timegm((2025, 1, 31, 23, 59, 59, 0, 0, 0))
    assert quota.month_period(last_second_of_january) == "2025-01"
    assert quota.month_period(last_second_of_january + 1) == "2025-02"
    assert quota.validate_period(quota.month_period()) == quota.month_period()


def test_wire_round_trip_with_a_quota() -> None:
    for q, counters, tokens in (
        (tokens_quota(10), Counters(5, 1), 6),
        (spend_cap(0), Counters(), 0),
        (tokens_quota(None), Counters(0, 0), 50),
    ):
        decision = check(q, counters, tokens=tokens, spend=1).decision
        wire = decision.to_wire()
        assert len(wire) == bucket.QUOTA_WIRE_LENGTH
        assert (
            LimitDecision.from_wire(wire, bucket.normalise_limits(LIMITS), period=PERIOD)
            == decision
        )
    with pytest.raises(ValueError, match="expected 12"):
        LimitDecision.from_wire(wire[:8], LIMITS, period=PERIOD)


@settings(max_examples=300, deadline=None)
@given(
    token_quota=st.one_of(st.none(), st.integers(0, 2000)),
    spend_cap_micros=st.one_of(st.none(), st.integers(0, 2000)),
    used=st.tuples(
        st.one_of(st.none(), st.integers(0, 2000)), st.one_of(st.none(), st.integers(0, 2000))
    ),
    tokens=st.integers(0, 2000),
    spend=st.integers(0, 2000),
    level=st.integers(-60_000_000, 60_000_000),
)
def test_quota_decisions_follow_the_formula_and_never_touch_buckets(
    token_quota: int | None,
    spend_cap_micros: int | None,
    used: tuple[int | None, int | None],
    tokens: int,
    spend: int,
    level: int,
) -> None:
    counters = Counters(*used)
    q = Quota(PERIOD, token_quota, spend_cap_micros)
    token_bucket = BucketLevel(level=level, updated_ms=T0)
    outcome = check(q, counters, tokens=tokens, spend=spend, token_bucket=token_bucket)
    used_tokens, used_spend = used[0] or 0, used[1] or 0
    # Used up, or would not fit.
    over_tokens = token_quota is not None and (
        used_tokens >= token_quota or used_tokens + tokens > token_quota
    )
    over_spend = spend_cap_micros is not None and (
        used_spend >= spend_cap_micros or used_spend + spend > spend_cap_micros
    )
    expected = QuotaKind.TOKENS if over_tokens else QuotaKind.SPEND if over_spend else None
    assert outcome.decision.quota_exceeded is expected
    assert outcome.decision.quota == counters.state(PERIOD)
    if expected is not None:
        assert not outcome.decision.allowed
        assert outcome.requests is None
        assert outcome.tokens is None


def test_a_quota_that_limits_nothing_admits_without_counters() -> None:
    unlimited = Quota(period=PERIOD, token_quota=None, spend_cap_micros=None)
    outcome = check(unlimited, Counters(), tokens=10)
    assert outcome.decision.allowed
    assert outcome.decision.quota == QuotaState(PERIOD, 0, 0, known=False)


@pytest.mark.parametrize(
    ("counters", "missing"),
    [
        (Counters(), {QuotaKind.TOKENS, QuotaKind.SPEND}),
        (Counters(tokens=5), {QuotaKind.SPEND}),
        (Counters(spend_micros=5), {QuotaKind.TOKENS}),
        (Counters(0, 0), set()),
    ],
)
def test_the_state_says_which_counters_are_missing(
    counters: Counters, missing: set[QuotaKind]
) -> None:
    state = counters.state(PERIOD)
    assert state.missing == missing
    assert state.known is (not missing)
    wire = bucket.missing_to_wire(state.missing)
    assert bucket.missing_from_wire(wire) == missing
    assert quota.state_from_wire(PERIOD, 5, 6, wire).missing == missing
