"""The billing ledger and prices on every store (SQLite, PostgreSQL, the unit-test fake)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from authz.models import CLI_ACTOR, ModelPrice, UsageRow
from authz.store.base import LedgerMark, Store
from authz.store.common import InvalidInput

pytestmark = pytest.mark.integration
HOUR = datetime(2026, 11, 27, 9, tzinfo=UTC)


def row(**changes: object) -> UsageRow:
    values: dict[str, object] = {
        "hour": HOUR,
        "workspace_id": "ws_a",
        "key_id": "key_a",
        "model": "gpt",
        "requests": 2,
        "prompt_tokens": 30,
        "completion_tokens": 12,
        "errors_4xx": 0,
        "errors_5xx": 1,
        "spend_usd": 0.25,
    }
    values.update(changes)
    return UsageRow(**values)  # type: ignore[arg-type]


async def test_batches_add_up_and_a_retried_batch_counts_once(store: Store) -> None:
    assert await store.apply_usage_batch("b1", [row(), row(model="other")])
    assert await store.apply_usage_batch("b2", [row()])
    assert not await store.apply_usage_batch("b1", [row(), row(model="other")])
    rows = await store.usage_report(workspace_id="ws_a")
    assert [(r.model, r.requests, r.prompt_tokens, r.errors_5xx) for r in rows] == [
        ("gpt", 4, 60, 2),
        ("other", 2, 30, 1),
    ]
    assert rows[0].spend_usd == pytest.approx(0.5)
    assert rows[0].hour == HOUR


async def test_report_filters_and_period_totals(store: Store) -> None:
    later = HOUR.replace(day=28)
    await store.apply_usage_batch(
        "b", [row(), row(key_id="key_b", hour=later), row(workspace_id="ws_b")]
    )
    assert len(await store.usage_report(key_id="key_b")) == 1
    assert len(await store.usage_report(workspace_id="ws_a", since=later)) == 1
    assert len(await store.usage_report(workspace_id="ws_a", until=later)) == 1
    tokens, spend = await store.period_totals("ws_a", HOUR, later.replace(hour=23))
    assert tokens == 84
    assert spend == pytest.approx(0.5)


async def test_prices(store: Store) -> None:
    await store.set_price(ModelPrice("gpt", 1.5, 6.0), actor=CLI_ACTOR)
    await store.set_price(ModelPrice("*", 1.0, 2.0), actor=CLI_ACTOR)
    await store.set_price(ModelPrice("gpt", 2.0, 8.0), actor=CLI_ACTOR)
    prices = {p.model: (p.input_per_1m_usd, p.output_per_1m_usd) for p in await store.list_prices()}
    assert prices == {"*": (1.0, 2.0), "gpt": (2.0, 8.0)}
    with pytest.raises(InvalidInput, match="input_per_1m_usd"):
        await store.set_price(ModelPrice("x", -1.0, 0.0), actor=CLI_ACTOR)


async def test_estimated_tokens_are_kept_apart_and_count_in_the_period(store: Store) -> None:
    """Requests whose usage was never reported are charged by estimate, shown apart."""
    await store.apply_usage_batch("e1", [row(estimated_requests=1, estimated_tokens=500)])
    await store.apply_usage_batch("e2", [row(estimated_requests=2, estimated_tokens=700)])
    (only,) = await store.usage_report(workspace_id="ws_a")
    assert (only.prompt_tokens, only.completion_tokens) == (60, 24)
    assert (only.estimated_requests, only.estimated_tokens) == (3, 1200)
    tokens, _ = await store.period_totals("ws_a", HOUR, HOUR.replace(hour=23))
    assert tokens == 84 + 1200


async def test_a_snapshot_says_which_batches_it_holds(store: Store) -> None:
    """Each batch raises its replica's mark of every month it touches (never lowers it), in its
    own transaction; a snapshot returns a month's totals with those marks."""
    december = HOUR.replace(month=12)
    assert await store.apply_usage_batch(
        "m1", [row(), row(workspace_id="ws_b"), row(hour=december)], mark=LedgerMark("r1", 7)
    )
    assert await store.apply_usage_batch("m2", [row(model="x")], mark=LedgerMark("r2", 3))
    assert await store.apply_usage_batch("m3", [row(model="y")], mark=LedgerMark("r1", 5))
    assert not await store.apply_usage_batch("m2", [row(model="x")], mark=LedgerMark("r2", 9))
    assert await store.apply_usage_batch("m4", [row(model="z")])  # no mark: none moves
    snapshot = await store.ledger_snapshot("ws_a", "2026-11")
    assert snapshot.tokens == 4 * 42
    assert snapshot.spend_usd == pytest.approx(1.0)
    assert dict(snapshot.marks) == {"r1": 7, "r2": 3}
    other = await store.ledger_snapshot("ws_b", "2026-11")
    assert (other.tokens, dict(other.marks)) == (42, {"r1": 7})
    assert dict((await store.ledger_snapshot("ws_a", "2026-12")).marks) == {"r1": 7}
    empty = await store.ledger_snapshot("ws_c", "2026-11")
    assert (empty.tokens, empty.spend_usd, dict(empty.marks)) == (0, 0.0, {})
