"""Latency buckets and denials per hour on every store (SQLite, PostgreSQL, the fake)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from authz.store.base import Store
from authz.usage.latency import bucket_of, merge, percentile
from authz.usage.observed import DenialRow, LatencyRow

pytestmark = pytest.mark.integration
HOUR = datetime(2026, 11, 27, 9, tzinfo=UTC)
NEXT = HOUR + timedelta(hours=1)


async def test_batches_add_up_per_bucket_and_a_retried_batch_counts_once(store: Store) -> None:
    fast, slow = bucket_of(0.010), bucket_of(0.800)
    first = [LatencyRow(HOUR, "ws_a", "key_a", fast, 9), LatencyRow(HOUR, "ws_a", "key_a", slow, 1)]
    denied = [DenialRow(HOUR, "ws_a", "key_a", "rate_limit_tokens", 2)]
    assert await store.apply_observation_batch("o1", first, denied)
    assert not await store.apply_observation_batch("o1", first, denied)
    # Another replica's batch for the same hour adds to the same rows.
    assert await store.apply_observation_batch(
        "o2",
        [LatencyRow(HOUR, "ws_a", "key_a", fast, 10)],
        [DenialRow(HOUR, "ws_a", "key_a", "rate_limit_tokens", 1)],
    )
    rows = await store.latency_report("ws_a", HOUR, NEXT)
    assert [(r.hour, r.key_id, r.bucket, r.count) for r in rows] == [
        (HOUR, "key_a", fast, 19),
        (HOUR, "key_a", slow, 1),
    ]
    p95 = percentile(merge([{r.bucket: r.count} for r in rows]), 0.95)
    assert p95 is not None
    assert 8 < p95 < 12  # 19 of 20 requests took 10 ms
    denials = await store.denial_report("ws_a", HOUR, NEXT)
    assert [(r.key_id, r.reason, r.count) for r in denials] == [("key_a", "rate_limit_tokens", 3)]


async def test_reports_are_per_workspace_and_range(store: Store) -> None:
    assert await store.apply_observation_batch(
        "o",
        [
            LatencyRow(HOUR, "ws_a", "key_a", 3, 1),
            LatencyRow(NEXT, "ws_a", "key_b", 4, 2),
            LatencyRow(HOUR, "ws_b", "key_c", 5, 7),
        ],
        [
            DenialRow(HOUR, "ws_a", "", "unauthenticated", 1),
            DenialRow(NEXT, "ws_a", "key_b", "insufficient_quota", 4),
            DenialRow(HOUR, "ws_b", "key_c", "rate_limit_requests", 5),
        ],
    )
    assert [(r.key_id, r.count) for r in await store.latency_report("ws_a", HOUR, NEXT)] == [
        ("key_a", 1)
    ]
    later = await store.latency_report("ws_a", NEXT, NEXT + timedelta(hours=1))
    assert [(r.hour, r.key_id, r.bucket, r.count) for r in later] == [(NEXT, "key_b", 4, 2)]
    both = await store.denial_report("ws_a", HOUR, NEXT + timedelta(hours=1))
    assert [(r.hour, r.key_id, r.reason, r.count) for r in both] == [
        (HOUR, "", "unauthenticated", 1),
        (NEXT, "key_b", "insufficient_quota", 4),
    ]
    assert await store.denial_report("ws_c", HOUR, NEXT) == []
    assert await store.apply_observation_batch("empty", [], [])
