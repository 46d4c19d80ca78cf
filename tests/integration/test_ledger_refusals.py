"""A batch PostgreSQL refuses (NUL in text) is split: the good rows land, the bad one is set
aside, and the ledger goes on. The accountant is the production one, on a real store."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from prometheus_client import CollectorRegistry

from authz.metrics import Metrics
from authz.models import UsageRow
from authz.resolver import KeyResolver
from authz.store import open_store
from authz.usage.accountant import Batch, UsageAccountant
from authz.usage.pricing import PriceTable
from ratelimit.memory import InMemoryRateLimiter

pytestmark = pytest.mark.integration
HOUR = datetime(2026, 11, 27, 9, tzinfo=UTC)


def row(key_id: str, model: str) -> UsageRow:
    return UsageRow(HOUR, "ws_a", key_id, model, 1, 2, 3, 0, 0, 0.0)


async def test_postgres_refusing_one_row_does_not_stop_the_others(pg_dsn: str) -> None:
    store = await open_store(pg_dsn, poll_interval=0.02, read_timeout=2.0)
    await store.migrate()
    metrics = Metrics(CollectorRegistry())
    books = UsageAccountant(
        store=store,
        limiter=InMemoryRateLimiter(clock_ms=lambda: 0),
        resolver=KeyResolver(
            store, metrics, size=1, ttl=1, negative_size=1, negative_ttl=1, stale_if_error=0
        ),
        prices=PriceTable(),
        metrics=metrics,
        flush_interval=60,
    )
    try:
        # Rows as an older parser let through: PostgreSQL refuses the NUL in text.
        books._unapplied.append(Batch("b1", [row("key_a", "m"), row("key_bad", "x\u0000y")], 0))
        books._unapplied.append(Batch("b2", [row("key_b", "m")], 1))
        await books.flush()
        landed = await store.usage_report(workspace_id="ws_a")
        assert sorted(r.key_id for r in landed) == ["key_a", "key_b"]
        assert metrics.ledger_rows_set_aside._value.get() == 1
        assert not books._unapplied
    finally:
        await store.close()
