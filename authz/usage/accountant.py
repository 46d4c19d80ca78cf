"""Reconciliation: what each allowed request really used, charged where it belongs.

For every access-log entry: the ledger tallies it first (nothing below can drop it), then the
TPM bucket gets the difference between reserved and used tokens (`UsageEvent.bucket_delta`:
nothing for a request that took nothing from the buckets; usage the upstream did not report is
charged by estimate, never free: see `UsageEvent.estimated_tokens`), the month's token and spend
counters grow, per-workspace metrics move, and the hourly ledger aggregates in memory until
the next flush. A flush is one idempotent batch: a retry after an error reuses its batch id,
so it can never be counted twice.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

from authz.metrics import Metrics
from authz.models import ModelPrice, UsageRow
from authz.resolver import KeyResolver
from authz.store.base import Change, ChangeKind, Store, StoreUnavailable
from authz.textsafe import printable
from authz.usage.counters import CounterUpdate, CounterUpdates
from authz.usage.events import UsageEvent
from authz.usage.periods import HourSlots
from authz.usage.pricing import UNITS_PER_MICRO, PriceTable, SpendCarry, spend_units
from authz.usage.seeding import DEFAULT_SEED_TIMEOUT_S, QuotaSeeder
from authz.usage.totals import WorkspaceTotals
from ratelimit.limiter import RateLimiter

log = logging.getLogger(__name__)

LedgerKey = tuple[datetime, str, str, str]
MAX_QUEUED_ROWS = 100_000
"""Ledger rows held for retry during a database outage before readiness fails (~30 MB)."""
SET_ASIDE_LOG_INTERVAL_S = 60.0
_OUTCOMES = ("reported", "estimated", "no_usage")


@dataclass(frozen=True, slots=True)
class Batch:
    """Ledger rows written in one transaction under one id, so a retry applies them once."""

    batch_id: str
    rows: list[UsageRow]
    generation: int
    part: int | None = None
    """For one row of a split batch: its number (the batch's ledger position, see marks)."""


@dataclass(slots=True)
class _Tally:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors_4xx: int = 0
    errors_5xx: int = 0
    spend_units: int = 0
    """Exact (pricing.UNITS_PER_MICRO): the ledger sums what was charged, not what each
    request rounded to."""
    estimated_requests: int = 0
    estimated_tokens: int = 0


class UsageAccountant:
    """Turns usage events into bucket adjustments, quota counters, metrics and ledger rows."""

    def __init__(
        self,
        *,
        store: Store,
        limiter: RateLimiter,
        resolver: KeyResolver,
        prices: PriceTable,
        metrics: Metrics,
        flush_interval: float,
        max_queued_rows: int = MAX_QUEUED_ROWS,
        clock: Callable[[], float] = time.time,
        seeder: QuotaSeeder | None = None,
    ) -> None:
        self._store = store
        self._limiter = limiter
        self._resolver = resolver
        self._prices = prices
        self._metrics = metrics
        self._flush_interval = flush_interval
        self._clock = clock
        self._pending: dict[LedgerKey, _Tally] = {}
        self._unapplied: list[Batch] = []
        self._generation = 0
        """Each tally's number: rows tallied under it reach the ledger with its batch."""
        self._max_queued_rows = max_queued_rows
        self._set_aside_logged_at = -math.inf
        self._unlogged_set_aside = 0
        self._flush_lock = asyncio.Lock()
        self._carry = SpendCarry()
        self._hours = HourSlots()
        self._totals = WorkspaceTotals(metrics)
        self._counters = CounterUpdates(
            limiter=limiter,
            resolver=resolver,
            metrics=metrics,
            seeder=seeder or QuotaSeeder(store, limiter, timeout_s=DEFAULT_SEED_TIMEOUT_S),
        )
        self._tasks: set[asyncio.Task[None]] = set()

    async def record(self, event: UsageEvent) -> None:
        await self.record_batch((event,))

    async def record_batch(self, events: Iterable[UsageEvent]) -> None:
        """Account for the entries of one Envoy message: each is tallied on its own, while the
        counters get one update per workspace and month, and the metrics move once per label
        (the same totals, for a fraction of the calls: on Redis, one script call per workspace
        instead of one per entry). The TPM bucket takes the message's summed difference in one
        step, which equals the steps one by one unless one of them would have hit the bucket's
        bounds (full, or a whole capacity in debt): then the sum is the fairer of the two, as
        the order of entries inside a message is only the order requests happened to end."""
        charges: dict[tuple[str, str], list[int]] = {}
        observed = self._totals
        outcomes = [0, 0, 0]  # reported, estimated, no_usage
        for event in events:
            for name in event.rejected:
                self._metrics.usage_fields_rejected.labels(name).inc()
            estimated = event.estimated_tokens
            spend = spend_units(
                self._price_of(event),
                event.prompt_tokens or 0,
                event.completion_tokens or 0,
                estimated,
            )
            hour, period = self._hours.of(event.started_at)
            # The ledger first: whatever happens to the counters, the report is billed.
            self._tally(event, hour, spend, estimated)
            observed.add(event, spend, estimated)
            outcomes[0 if event.reported else 1 if estimated else 2] += 1
            used = event.tokens_used
            charge = charges.get((event.workspace_id, period))
            if charge is None:
                charge = charges[(event.workspace_id, period)] = [0, 0, 0]
            charge[0] += event.bucket_delta
            charge[1] += used
            charge[2] += self._carry.charge_units(event.workspace_id, period, spend)
        observed.publish()
        for outcome, count in zip(_OUTCOMES, outcomes, strict=True):
            if count:
                self._metrics.reconciliations.labels(outcome).inc(count)
        for (workspace_id, period), (tpm_delta, tokens, spend_micros) in charges.items():
            await self._counters.charge(
                CounterUpdate(
                    workspace_id=workspace_id,
                    period=period,
                    tpm_delta=tpm_delta,
                    tokens=tokens,
                    spend_micros=spend_micros,
                    generation=self._generation,
                )
            )

    def _price_of(self, event: UsageEvent) -> ModelPrice | None:
        """The one place an event's price is chosen: the requested model's price in force at
        Check time, signed into the reservation (never the response's model, which upstreams
        answer with a dated name, nor today's price table)."""
        return event.price

    def _tally(self, event: UsageEvent, hour: datetime, spend: int, estimated: int) -> None:
        key = (hour, event.workspace_id, event.key_id, event.model)
        tally = self._pending.get(key)
        if tally is None:
            tally = self._pending[key] = _Tally()
        status = event.status
        tally.requests += 1
        tally.prompt_tokens += event.prompt_tokens or 0
        tally.completion_tokens += event.completion_tokens or 0
        tally.errors_4xx += 400 <= status < 500
        tally.errors_5xx += status >= 500 or status == 0
        tally.spend_units += spend
        tally.estimated_requests += estimated > 0
        tally.estimated_tokens += estimated

    async def flush(self) -> None:
        """Write what was tallied; retried batches keep their id so they apply once.

        An outage (StoreUnavailable) stops the flush until the next one. A batch the store
        refuses for any other reason (a value it cannot hold) is split and retried row by row,
        and a row it still refuses is set aside: one bad row never stops the ledger.
        """
        async with self._flush_lock:
            await self._counters.retry()
            while True:
                self._enqueue_pending()
                if not self._unapplied:
                    await self._counters.fold_written()
                    return
                batch = self._unapplied[0]
                batch_id, rows = batch.batch_id, batch.rows
                mark = self._counters.mark(batch.generation, batch.part)
                try:
                    applied = await self._store.apply_usage_batch(batch_id, rows, mark=mark)
                except StoreUnavailable as error:
                    self._metrics.ledger_flushes.labels("failed").inc()
                    log.warning("ledger: flush of %d rows failed, will retry: %s", len(rows), error)
                    return
                except Exception as error:  # refused data, not an outage: see the docstring
                    self._unapplied.pop(0)
                    if len(rows) > 1:
                        self._metrics.ledger_flushes.labels("split").inc()
                        # The refused batch rolled back whole: each row is new to the store.
                        singles = [
                            Batch(f"{batch_id}.{n}", [row], batch.generation, n)
                            for n, row in enumerate(rows)
                        ]
                        self._unapplied[0:0] = singles
                    else:
                        self._set_aside(rows[0], error)
                    self._count_queue()
                    continue
                self._metrics.ledger_flushes.labels("applied" if applied else "duplicate").inc()
                self._counters.written(rows, mark)
                self._unapplied.pop(0)
                self._count_queue()

    def _enqueue_pending(self) -> None:
        """Move the tally into the retry queue while the queue has room. When it is full the
        tally keeps aggregating in place (one row per hour, key and model), and readiness says
        so until the store takes the backlog."""
        if not self._pending or self._queued_rows() + len(self._pending) > self._max_queued_rows:
            return
        rows = [_row(key, tally) for key, tally in self._pending.items()]
        self._pending = {}
        self._unapplied.append(Batch(uuid.uuid4().hex, rows, self._generation))
        self._generation += 1
        self._count_queue()

    def _queued_rows(self) -> int:
        return sum(len(batch.rows) for batch in self._unapplied)

    def _count_queue(self) -> None:
        self._metrics.ledger_queue_rows.set(self._queued_rows())

    def backlog_problem(self) -> str | None:
        """A readiness reason while a retry queue is full (ledger rows or counter updates)."""
        queued = self._queued_rows()
        if queued + len(self._pending) <= self._max_queued_rows:
            return self._counters.backlog_problem()
        return f"{queued} rows wait for the ledger (limit {self._max_queued_rows})"

    def _set_aside(self, row: UsageRow, error: Exception) -> None:
        self._metrics.ledger_rows_set_aside.inc()
        self._unlogged_set_aside += 1
        now = self._clock()
        if now - self._set_aside_logged_at < SET_ASIDE_LOG_INTERVAL_S:
            return
        log.error(
            "ledger: store refused a row for %s/%s %s model %s (%s); set aside, "
            "%d such rows since the last report",
            row.workspace_id,
            row.key_id,
            row.hour.isoformat(),
            printable(row.model),
            type(error).__name__,
            self._unlogged_set_aside,
        )
        self._set_aside_logged_at = now
        self._unlogged_set_aside = 0

    async def load_prices(self) -> None:
        try:
            self._prices.replace(await self._store.list_prices())
        except StoreUnavailable as error:
            log.warning("prices: cannot load, keeping the previous table: %s", error)

    async def run(self) -> None:
        await self.load_prices()
        while True:
            await asyncio.sleep(self._flush_interval)
            await self.flush()

    # ChangeSink (prices only; keys and workspaces go to the resolver)

    def on_change(self, change: Change) -> None:
        if change.kind is ChangeKind.PRICE:
            self._reload_prices()

    def on_reset(self) -> None:
        self._reload_prices()

    def _reload_prices(self) -> None:
        task = asyncio.get_running_loop().create_task(self.load_prices())
        # Keep a reference until done: the loop holds tasks only weakly.
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _row(key: LedgerKey, tally: _Tally) -> UsageRow:
    hour, workspace_id, key_id, model = key
    return UsageRow(
        hour=hour,
        workspace_id=workspace_id,
        key_id=key_id,
        model=model,
        requests=tally.requests,
        prompt_tokens=tally.prompt_tokens,
        completion_tokens=tally.completion_tokens,
        errors_4xx=tally.errors_4xx,
        errors_5xx=tally.errors_5xx,
        spend_usd=tally.spend_units / (UNITS_PER_MICRO * 10**6),  # int / int rounds once
        estimated_requests=tally.estimated_requests,
        estimated_tokens=tally.estimated_tokens,
    )
