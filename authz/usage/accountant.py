"""Reconciliation: what each allowed request really used, charged where it belongs.

For every access-log entry: the TPM bucket gets the difference between reserved and used
tokens (a full refund when the upstream reported nothing), the month's token and spend
counters grow, per-workspace metrics move, and the hourly ledger aggregates in memory until
the next flush. A flush is one idempotent batch: a retry after an error reuses its batch id,
so it can never be counted twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from authz.metrics import Metrics
from authz.models import UsageRow
from authz.resolver import KeyResolver
from authz.store.base import Change, ChangeKind, Store, StoreUnavailable
from authz.usage.events import UsageEvent
from authz.usage.periods import hour_of, period_of
from authz.usage.pricing import PriceTable, spend_micros_at
from authz.usage.seeding import month_from_ledger
from ratelimit.limiter import Limits, RateLimiter, RateLimitUnavailable

log = logging.getLogger(__name__)

LedgerKey = tuple[datetime, str, str, str]


@dataclass(slots=True)
class _Tally:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors_4xx: int = 0
    errors_5xx: int = 0
    spend_micros: int = 0


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
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._limiter = limiter
        self._resolver = resolver
        self._prices = prices
        self._metrics = metrics
        self._flush_interval = flush_interval
        self._clock = clock
        self._pending: dict[LedgerKey, _Tally] = {}
        self._unapplied: list[tuple[str, list[UsageRow]]] = []
        self._flush_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    async def record(self, event: UsageEvent) -> None:
        # The price in force at Check time, signed into the reservation (never the response's
        # model, which upstreams answer with a dated name).
        spend = spend_micros_at(event.price, event.prompt_tokens or 0, event.completion_tokens or 0)
        await self._reconcile(event, spend)
        self._tally(event, spend)
        self._observe(event, spend)

    async def _reconcile(self, event: UsageEvent, spend_micros: int) -> None:
        workspace = await self._resolver.workspace(event.workspace_id)
        if workspace is None:
            return  # deleted since: nothing left to charge
        limits = Limits(rpm=workspace.rpm, tpm=workspace.tpm)
        period = period_of(event.started_at)
        try:
            state = await self._limiter.record_usage(
                event.workspace_id,
                limits,
                period=period,
                tpm_delta=event.tokens_used - event.reserved_tokens,
                tokens=event.tokens_used,
                spend_micros=spend_micros,
            )
            if not state.known:
                await self._restore_month(event.workspace_id, limits, period)
        except RateLimitUnavailable as error:
            # The ledger still records the usage; only the live bucket misses this adjustment.
            self._metrics.reconciliations.labels("limiter_unavailable").inc()
            log.warning("usage: bucket not adjusted for %s: %s", event.workspace_id, error)
            return
        self._metrics.reconciliations.labels("reported" if event.reported else "no_usage").inc()

    async def _restore_month(self, workspace_id: str, limits: Limits, period: str) -> None:
        """This call created the month's counters (Redis lost them, or a new process): add what
        the ledger already holds. Only the replica whose increment created them gets here, and
        the Check path's seeding only fills counters that are absent, so nothing counts twice.
        """
        try:
            tokens, spend_micros = await month_from_ledger(self._store, workspace_id, period)
        except StoreUnavailable as error:
            log.warning(
                "usage: cannot restore %s %s from the ledger: %s", workspace_id, period, error
            )
            return
        if tokens or spend_micros:
            await self._limiter.record_usage(
                workspace_id,
                limits,
                period=period,
                tpm_delta=0,
                tokens=tokens,
                spend_micros=spend_micros,
            )

    def _tally(self, event: UsageEvent, spend_micros: int) -> None:
        key = (hour_of(event.started_at), event.workspace_id, event.key_id, event.model)
        tally = self._pending.get(key)
        if tally is None:
            tally = self._pending[key] = _Tally()
        tally.requests += 1
        tally.prompt_tokens += event.prompt_tokens or 0
        tally.completion_tokens += event.completion_tokens or 0
        tally.errors_4xx += 400 <= event.status < 500
        tally.errors_5xx += event.status >= 500 or event.status == 0
        tally.spend_micros += spend_micros

    def _observe(self, event: UsageEvent, spend_micros: int) -> None:
        metrics = self._metrics
        label = metrics.workspace(event.workspace_id)
        status_class = f"{event.status // 100}xx" if event.status else "none"
        metrics.workspace_requests.labels(label, status_class).inc()
        if event.prompt_tokens:
            metrics.workspace_tokens.labels(label, "prompt").inc(event.prompt_tokens)
        if event.completion_tokens:
            metrics.workspace_tokens.labels(label, "completion").inc(event.completion_tokens)
        if spend_micros:
            metrics.workspace_spend.labels(label).inc(spend_micros / 1e6)
        if event.upstream_seconds is not None:
            metrics.workspace_upstream_latency.labels(label).observe(event.upstream_seconds)

    async def flush(self) -> None:
        """Write what was tallied; retried batches keep their id so they apply once."""
        async with self._flush_lock:
            if self._pending:
                rows = [
                    UsageRow(
                        hour=hour,
                        workspace_id=workspace_id,
                        key_id=key_id,
                        model=model,
                        requests=t.requests,
                        prompt_tokens=t.prompt_tokens,
                        completion_tokens=t.completion_tokens,
                        errors_4xx=t.errors_4xx,
                        errors_5xx=t.errors_5xx,
                        spend_usd=t.spend_micros / 1e6,
                    )
                    for (hour, workspace_id, key_id, model), t in self._pending.items()
                ]
                self._pending = {}
                self._unapplied.append((uuid.uuid4().hex, rows))
            while self._unapplied:
                batch_id, rows = self._unapplied[0]
                try:
                    applied = await self._store.apply_usage_batch(batch_id, rows)
                except StoreUnavailable as error:
                    self._metrics.ledger_flushes.labels("failed").inc()
                    log.warning("ledger: flush of %d rows failed, will retry: %s", len(rows), error)
                    return
                self._metrics.ledger_flushes.labels("applied" if applied else "duplicate").inc()
                self._unapplied.pop(0)

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
