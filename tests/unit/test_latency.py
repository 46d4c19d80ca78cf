"""The latency histogram: buckets, merging and percentiles (authz/usage/latency.py)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authz.usage.latency import OVERFLOW, bucket_of, merge, percentile, upper_ms
from authz.usage.observed import UNAUTHENTICATED, denial_reason

durations = st.floats(min_value=0.0, max_value=200.0, allow_nan=False)


def histogram(seconds: list[float]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for value in seconds:
        counts[bucket_of(value)] = counts.get(bucket_of(value), 0) + 1
    return counts


def test_bounds_and_edges() -> None:
    assert bucket_of(0.0) == 0
    assert bucket_of(-1.0) == 0
    assert bucket_of(float("nan")) == 0
    assert bucket_of(0.001) == 0  # exactly 1 ms
    assert bucket_of(0.002) == 4  # exactly 2 ms: the upper bound of bucket 4
    assert bucket_of(0.00201) == 5
    assert bucket_of(131.072) == OVERFLOW - 1
    assert bucket_of(131.1) == OVERFLOW
    assert bucket_of(float("inf")) == OVERFLOW


@given(durations)
def test_a_duration_lies_within_its_bucket(seconds: float) -> None:
    bucket = bucket_of(seconds)
    ms = seconds * 1000
    if bucket == OVERFLOW:
        assert ms > upper_ms(OVERFLOW - 1)
    else:
        assert ms <= upper_ms(bucket)
        assert bucket == 0 or ms > upper_ms(bucket - 1)


@given(st.lists(durations, min_size=1, max_size=200), st.sampled_from([0.5, 0.95, 0.99]))
def test_percentile_is_within_a_bucket_of_the_exact_answer(seconds: list[float], q: float) -> None:
    ordered = sorted(seconds)
    # The exact q-quantile as the histogram defines rank: the ceil(q*n)-th smallest value.
    exact_ms = ordered[max(0, math.ceil(q * len(ordered)) - 1)] * 1000
    estimate = percentile(histogram(seconds), q)
    assert estimate is not None
    bucket = bucket_of(exact_ms / 1000)
    lower = 0.0 if bucket == 0 else upper_ms(bucket - 1)
    if bucket == OVERFLOW:
        assert estimate == upper_ms(OVERFLOW - 1)
    else:
        assert lower <= estimate <= upper_ms(bucket) + 1e-9


@given(st.lists(durations, max_size=50), st.lists(durations, max_size=50))
def test_merging_summaries_equals_summarizing_everything(a: list[float], b: list[float]) -> None:
    assert merge([histogram(a), histogram(b)]) == histogram(a + b)


def test_percentiles_of_a_known_mix() -> None:
    # 90 fast requests (about 10 ms) and 10 slow ones (about 1 s).
    counts = merge([histogram([0.010] * 90), histogram([1.0] * 10)])
    p50 = percentile(counts, 0.5)
    p95 = percentile(counts, 0.95)
    assert p50 is not None
    assert upper_ms(13) < p50 <= upper_ms(14)
    assert p95 is not None
    assert upper_ms(39) < p95 <= upper_ms(40)
    assert percentile({}, 0.5) is None
    with pytest.raises(ValueError, match="quantile"):
        percentile(counts, 0.0)


def test_denial_reasons() -> None:
    assert denial_reason(401, "invalid_api_key", "invalid_request_error") == UNAUTHENTICATED
    assert denial_reason(429, "rate_limit_exceeded", "requests") == "rate_limit_requests"
    assert denial_reason(429, "rate_limit_exceeded", "tokens") == "rate_limit_tokens"
    assert denial_reason(429, "insufficient_quota", "insufficient_quota") == "insufficient_quota"
    assert denial_reason(400, "api_key_in_url", "invalid_request_error") is None
