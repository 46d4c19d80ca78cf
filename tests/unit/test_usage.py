"""Usage accounting units: access-log parsing, prices, periods, reconciliation and flushes."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from envoy.data.accesslog.v3.accesslog_pb2 import HTTPAccessLogEntry
from google.protobuf.struct_pb2 import Struct
from prometheus_client import CollectorRegistry

from authz.metrics import Metrics
from authz.models import CLI_ACTOR, ModelPrice, UsageRow
from authz.resolver import KeyResolver
from authz.store.base import Change, ChangeKind, LedgerMark, StoreUnavailable
from authz.usage.accountant import UsageAccountant
from authz.usage.events import UsageEvent, parse_entry
from authz.usage.periods import period_bounds, period_of, seconds_until_next_period
from authz.usage.pricing import PriceTable, spend_exact
from ratelimit.limiter import Limits, Quota
from ratelimit.memory import InMemoryRateLimiter
from tests.support.fakes import FakeStore, workspace

START = datetime(2026, 11, 30, 23, 59, 30, tzinfo=UTC)


def entry(
    authz: dict[str, Any] | None, usage: dict[str, Any] | None, status: int = 200
) -> HTTPAccessLogEntry:
    log = HTTPAccessLogEntry()
    log.common_properties.start_time.FromDatetime(START)
    log.common_properties.time_to_first_upstream_tx_byte.FromMilliseconds(2)
    log.common_properties.time_to_last_upstream_rx_byte.FromMilliseconds(252)
    log.response.response_code.value = status
    for namespace, fields in (("envoy.filters.http.ext_authz", authz), ("oais.usage", usage)):
        if fields is not None:
            struct = Struct()
            struct.update(fields)
            log.common_properties.metadata.filter_metadata[namespace].CopyFrom(struct)
    return log


ALLOW = {"decision": "allow", "workspace_id": "ws_test", "key_id": "key_1", "reserved_tokens": 70}
PRICED = {  # the reservation's claims (the MAC is the access-log gate's business, not tested here)
    **ALLOW,
    "reservation_id": "r1",
    "reserved_at": int(START.timestamp()),
    "requested_model": "gpt",
    "price_input_per_1m_usd": 1.0,
    "price_output_per_1m_usd": 3.0,
}


def test_parse_entry_reads_authz_and_usage_metadata() -> None:
    event = parse_entry(entry(ALLOW, {"prompt_tokens": 12, "completion_tokens": 5, "model": "gpt"}))
    assert event == UsageEvent(
        workspace_id="ws_test",
        key_id="key_1",
        reserved_tokens=70,
        model="gpt",
        prompt_tokens=12,
        completion_tokens=5,
        status=200,
        started_at=START,
        upstream_seconds=pytest.approx(0.25),  # type: ignore[arg-type]
        response_model="gpt",
    )
    assert event is not None
    assert (event.reported, event.tokens_used) == (True, 17)


@pytest.mark.parametrize(
    "authz",
    [None, {**ALLOW, "decision": "deny"}, {"decision": "allow"}, {**ALLOW, "workspace_id": 5}],
)
def test_entries_that_are_not_our_allows_are_ignored(authz: dict[str, Any] | None) -> None:
    assert parse_entry(entry(authz, None)) is None


def test_garbage_usage_counts_as_unreported() -> None:
    event = parse_entry(entry(ALLOW, {"prompt_tokens": "many", "completion_tokens": -3}, 502))
    assert event is not None
    assert (event.reported, event.tokens_used, event.model, event.status) == (
        False,
        0,
        "unknown",
        502,
    )


def test_prices_default_row_and_micros() -> None:
    table = PriceTable([ModelPrice("gpt", 2.0, 8.0), ModelPrice("*", 1.0, 1.0)])
    assert round(spend_exact(table.price_for("gpt"), 1000, 500)) == 2000 + 4000
    assert round(spend_exact(table.price_for("other"), 1000, 500)) == 1500
    assert round(spend_exact(PriceTable().price_for("gpt"), 1000, 500)) == 0


def test_periods_are_utc_months() -> None:
    assert period_of(START) == "2026-11"
    assert period_bounds("2026-12") == (
        datetime(2026, 12, 1, tzinfo=UTC),
        datetime(2027, 1, 1, tzinfo=UTC),
    )
    assert seconds_until_next_period(START.timestamp()) == 30
    with pytest.raises(ValueError, match="expected a period YYYY-MM"):
        period_bounds("2026-13")


class FlakyStore(FakeStore):
    """Applies a batch, then fails to say so: the worst case for double counting."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_after_apply = 1

    async def apply_usage_batch(
        self, batch_id: str, rows: Sequence[UsageRow], *, mark: LedgerMark | None = None
    ) -> bool:
        applied = await super().apply_usage_batch(batch_id, rows, mark=mark)
        if self.fail_after_apply:
            self.fail_after_apply -= 1
            raise StoreUnavailable("timeout after commit")
        return applied


def accountant(
    store: FakeStore,
    limiter: InMemoryRateLimiter,
    prices: PriceTable | None = None,
    *,
    max_queued_rows: int = 100,
    registry: CollectorRegistry | None = None,
) -> UsageAccountant:
    metrics = Metrics(registry or CollectorRegistry())
    resolver = KeyResolver(
        store, metrics, size=10, ttl=60, negative_size=10, negative_ttl=10, stale_if_error=0
    )
    return UsageAccountant(
        store=store,
        limiter=limiter,
        resolver=resolver,
        prices=prices or PriceTable([ModelPrice("*", 1.0, 3.0)]),
        metrics=metrics,
        flush_interval=60,
        max_queued_rows=max_queued_rows,
    )


async def test_reconcile_refunds_and_a_retried_flush_counts_once() -> None:
    store = FlakyStore()
    store.workspaces["ws_test"] = workspace(rpm=0, tpm=100)
    now = [0]
    limiter = InMemoryRateLimiter(clock_ms=lambda: now[0])
    books = accountant(store, limiter)
    admitted = await limiter.acquire("ws_test", Limits(rpm=0, tpm=100), 70)
    assert admitted.tokens.remaining == 30
    event = parse_entry(entry(PRICED, {"prompt_tokens": 12, "completion_tokens": 5}))
    assert event is not None
    await books.record(event)
    # 70 reserved, 17 used: 53 come back.
    after = await limiter.acquire("ws_test", Limits(rpm=0, tpm=100), 0)
    assert after.tokens.remaining == 83

    await books.flush()  # applied, but the store said it failed
    await books.flush()  # the retry carries the same batch id
    rows = [r for batch in store.batches.values() for r in batch]
    assert len(store.batches) == 1
    assert [(r.requests, r.prompt_tokens, r.completion_tokens) for r in rows] == [(1, 12, 5)]
    assert rows[0].spend_usd == pytest.approx((12 * 1.0 + 5 * 3.0) / 1e6)
    assert rows[0].hour == START.replace(minute=0, second=0)


async def test_lost_month_counters_are_restored_from_the_ledger_once() -> None:
    store = FakeStore()
    store.workspaces["ws_test"] = workspace(rpm=0, tpm=0)
    store.batches["earlier"] = [
        UsageRow(START.replace(hour=1), "ws_test", "key_1", "m", 3, 100, 50, 0, 0, 0.0)
    ]
    limiter = InMemoryRateLimiter(clock_ms=lambda: 0)  # a new process: no counters yet
    books = accountant(store, limiter)
    event = parse_entry(entry(ALLOW, {"prompt_tokens": 12, "completion_tokens": 5}))
    assert event is not None
    await books.record(event)
    await books.record(event)
    quota = Quota(period="2026-11", token_quota=1_000_000, spend_cap_micros=None)
    result = await limiter.acquire("ws_test", Limits(rpm=0, tpm=0), 0, quota=quota)
    assert result.quota is not None
    assert result.quota.tokens_used == 150 + 2 * 17


async def test_a_price_change_on_the_feed_reloads_the_table() -> None:
    store = FakeStore()
    prices = PriceTable([ModelPrice("*", 1.0, 1.0)])
    books = accountant(store, InMemoryRateLimiter(clock_ms=lambda: 0), prices)
    await store.set_price(ModelPrice("gpt", 5.0, 5.0), actor=CLI_ACTOR)
    # still the old default ("*" at 1.0)
    assert round(spend_exact(prices.price_for("gpt"), 1, 0)) == 1
    books.on_change(Change(ChangeKind.PRICE, "gpt"))
    while books._tasks:
        await asyncio.gather(*books._tasks)
    assert round(spend_exact(prices.price_for("gpt"), 1, 0)) == 5
