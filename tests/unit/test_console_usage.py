"""Ledger rows → the Observability page's hours, per-key totals and month totals."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from authz.api.gen import console_pb2, keys_pb2
from authz.api.messages import timestamp
from authz.console.usage import hourly, month_totals, observed, per_key, window

NOW = datetime(2026, 5, 3, 10, 42, tzinfo=UTC)
MONTH = datetime(2026, 5, 1, tzinfo=UTC)


def row(hour: datetime, key: str, requests: int, **more: Any) -> keys_pb2.UsageRow:
    return keys_pb2.UsageRow(hour=timestamp(hour), key_id=key, requests=requests, **more)


def test_windows_end_with_the_current_hour() -> None:
    day = window("24h", NOW, MONTH)
    assert day.until == datetime(2026, 5, 3, 11, tzinfo=UTC)
    assert day.since == datetime(2026, 5, 2, 11, tzinfo=UTC)
    assert window("month", NOW, MONTH).since == MONTH
    assert window("7d", NOW, MONTH).since == day.until - timedelta(days=7)


def test_hourly_has_every_hour_and_sums_keys_and_models() -> None:
    span = window("24h", NOW, MONTH)
    this_hour = datetime(2026, 5, 3, 10, tzinfo=UTC)
    points = hourly(
        [
            row(this_hour, "k1", 2, prompt_tokens=10, errors_4xx=1),
            row(this_hour, "k2", 3, completion_tokens=5, spend_usd=0.25),
            row(span.since - timedelta(hours=1), "k1", 99),  # before the window
        ],
        span,
    )
    assert len(points) == 24
    assert points[0]["hour"] == span.since.isoformat()
    assert points[0]["requests"] == 0
    last = points[-1]
    assert (last["requests"], last["prompt_tokens"], last["completion_tokens"]) == (5, 10, 5)
    assert (last["errors_4xx"], last["spend_usd"]) == (1, 0.25)


def test_per_key_totals_answer_is_the_old_key_still_used() -> None:
    early = datetime(2026, 5, 3, 8, tzinfo=UTC)
    late = datetime(2026, 5, 3, 10, tzinfo=UTC)
    totals = per_key([row(late, "old", 1), row(early, "old", 4), row(early, "new", 2)])
    assert totals["old"]["requests"] == 5
    assert totals["old"]["last_hour"] == late.isoformat()
    assert totals["new"]["last_hour"] == early.isoformat()


def test_month_totals_add_tokens_and_spend() -> None:
    rows = [
        row(MONTH, "k", 1, prompt_tokens=100, completion_tokens=50, spend_usd=0.1),
        row(MONTH, "k", 1, prompt_tokens=1, completion_tokens=2, spend_usd=0.2),
    ]
    assert month_totals(rows) == {"tokens": 153, "spend_usd": 0.3}


def test_observations_join_the_hours_and_the_keys() -> None:
    span = window("24h", NOW, MONTH)
    this_hour = datetime(2026, 5, 3, 10, tzinfo=UTC)
    points = hourly([row(this_hour, "new", 3)], span)
    keys = per_key([row(this_hour, "new", 3)])
    answer = console_pb2.GetObservationsResponse(
        hours=[
            console_pb2.HourObservation(
                hour=timestamp(this_hour),
                latency=console_pb2.Latency(requests=3, p50_ms=12.5, p95_ms=80.0),
                denials={"unauthenticated": 2},
            )
        ],
        keys=[
            console_pb2.KeyObservation(
                key_id="new", latency=console_pb2.Latency(requests=3, p50_ms=12.5, p95_ms=80.0)
            ),
            console_pb2.KeyObservation(key_id="old", denials={"unauthenticated": 2}),
        ],
        total=console_pb2.Latency(requests=3, p50_ms=12.5, p95_ms=80.0),
    )
    totals = observed(points, keys, answer)
    assert (points[-1]["p50_ms"], points[-1]["p95_ms"], points[-1]["unauthenticated"]) == (
        12.5,
        80.0,
        2,
    )
    assert (points[0]["p95_ms"], points[0]["rate_limit_tokens"]) == (0.0, 0)
    # The old key only shows up through its 401s: still in use somewhere, and refused.
    assert keys["old"]["requests"] == 0
    assert keys["old"]["denials"]["unauthenticated"] == 2
    assert keys["new"]["p95_ms"] == 80.0
    assert totals == {
        "latency": {"p50_ms": 12.5, "p95_ms": 80.0},
        "denials": {
            "unauthenticated": 2,
            "rate_limit_requests": 0,
            "rate_limit_tokens": 0,
            "insufficient_quota": 0,
        },
    }
