"""A ledger that cannot be poisoned: response strings validated, a refused row set aside
without stopping the rest, and a bounded retry queue that readiness reports when full."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]

from authz.health import Readiness
from authz.models import UsageRow
from authz.store.base import LedgerMark
from authz.usage.accountant import UsageAccountant
from authz.usage.events import INVALID_TEXT, parse_entry
from ratelimit.memory import InMemoryRateLimiter
from tests.support.fakes import FakeStore, workspace
from tests.unit.test_usage import ALLOW, accountant, entry


@pytest.mark.parametrize(
    ("model", "stored"),
    [
        ("x\u0000y", INVALID_TEXT),
        ("gpt\x1b[2J", INVALID_TEXT),
        ("gpt\nINCIDENT", INVALID_TEXT),
        ("g" * 129, INVALID_TEXT),
        ("g" * 128, "g" * 128),
        ("gpt-4o-2024-08-06", "gpt-4o-2024-08-06"),
        ("modèle-ü", "modèle-ü"),
    ],
)
def test_response_strings_are_validated(model: str, stored: str) -> None:
    event = parse_entry(entry(ALLOW, {"model": model, "completion_tokens": 1}))
    assert event is not None
    assert event.model == stored
    assert event.rejected == (("model",) if stored == INVALID_TEXT else ())


class PickyStore(FakeStore):
    """Refuses, as a database refuses a value it cannot hold, any batch with a row for key_bad."""

    async def apply_usage_batch(
        self, batch_id: str, rows: Sequence[UsageRow], *, mark: LedgerMark | None = None
    ) -> bool:
        if any(row.key_id == "key_bad" for row in rows):
            raise ValueError("invalid byte sequence")
        return await super().apply_usage_batch(batch_id, rows, mark=mark)


async def record_for(books: UsageAccountant, key_id: str) -> None:
    event = parse_entry(entry({**ALLOW, "key_id": key_id}, {"completion_tokens": 5}))
    assert event is not None
    await books.record(event)


async def test_a_refused_row_is_set_aside_and_the_rest_land() -> None:
    store = PickyStore()
    store.workspaces["ws_test"] = workspace()
    books = accountant(store, InMemoryRateLimiter(clock_ms=lambda: 0))
    for key_id in ("key_a", "key_bad", "key_b"):
        await record_for(books, key_id)
    await books.flush()
    landed = sorted(r.key_id for rows in store.batches.values() for r in rows)
    assert landed == ["key_a", "key_b"]
    metrics = books._metrics
    assert metrics.ledger_rows_set_aside._value.get() == 1
    assert metrics.ledger_flushes.labels("split")._value.get() == 1
    assert metrics.ledger_queue_rows._value.get() == 0
    # The ledger goes on: the next batch lands as usual.
    await record_for(books, "key_c")
    await books.flush()
    assert "key_c" in {r.key_id for rows in store.batches.values() for r in rows}


async def test_a_full_retry_queue_fails_readiness_until_it_drains() -> None:
    store = FakeStore()
    store.workspaces["ws_test"] = workspace()
    limiter = InMemoryRateLimiter(clock_ms=lambda: 0)
    books = accountant(store, limiter, max_queued_rows=2)
    readiness = Readiness(
        health_aio.HealthServicer(),
        store=store,
        limiter=limiter,
        metrics=books._metrics,
        limiter_required=False,
        interval=1,
        backlogs={"ledger": books.backlog_problem},
    )
    await store.migrate()
    assert await readiness.probe()
    for key_id in ("key_a", "key_b"):
        await record_for(books, key_id)
    store.down = True
    await books.flush()  # two rows queued: the limit, not past it
    await record_for(books, "key_c")
    await books.flush()
    assert books.backlog_problem() == "2 rows wait for the ledger (limit 2)"
    assert books._metrics.ledger_queue_rows._value.get() == 2
    store.down = False
    assert not await readiness.probe()
    assert books._metrics.ready.labels("ledger")._value.get() == 0
    await books.flush()  # the backlog lands, then the tally held back behind it
    assert await readiness.probe()
    landed = sorted(r.key_id for rows in store.batches.values() for r in rows)
    assert landed == ["key_a", "key_b", "key_c"]
