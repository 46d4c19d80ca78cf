"""The month's quota counters and the TPM bucket, charged once per usage report, eventually.

Each report becomes one `CounterUpdate` with its own operation id. A failed update (the rate
limiter unreachable, the workspace lookup failing) is queued and retried with the same id,
which the limiter's `record` step remembers: a call that ran although its reply was lost does
not count twice. The ledger is tallied apart and never waits for these.
"""

from __future__ import annotations

import logging
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from authz.metrics import Metrics
from authz.resolver import KeyResolver
from authz.store.base import Store, StoreUnavailable
from authz.usage.seeding import month_from_ledger
from ratelimit.limiter import Limits, QuotaKind, RateLimiter, RateLimitUnavailable

log = logging.getLogger(__name__)

MAX_QUEUED_UPDATES = 100_000
"""Counter updates held for retry before readiness fails (a few MB)."""


@dataclass(frozen=True, slots=True)
class CounterUpdate:
    """One usage report's charge to the bucket and the month's counters."""

    workspace_id: str
    period: str
    tpm_delta: int
    tokens: int
    spend_micros: int
    generation: int
    """The ledger tally the report went into (see `UsageAccountant.in_ledger`)."""
    operation_id: str = field(default_factory=lambda: uuid.uuid4().hex)


class CounterUpdates:
    """Applies counter updates, queueing the ones that fail for a retry with the same id."""

    def __init__(
        self,
        *,
        store: Store,
        limiter: RateLimiter,
        resolver: KeyResolver,
        metrics: Metrics,
        in_ledger: Callable[[int], bool],
        max_queued: int = MAX_QUEUED_UPDATES,
    ) -> None:
        self._store = store
        self._limiter = limiter
        self._resolver = resolver
        self._metrics = metrics
        self._in_ledger = in_ledger
        self._max_queued = max_queued
        self._queue: deque[CounterUpdate] = deque()

    async def charge(self, update: CounterUpdate) -> None:
        """Apply now, or queue behind earlier failures (they are retried first)."""
        if self._queue or not await self._apply(update):
            self._queue.append(update)
            self._metrics.usage_counter_queue.set(len(self._queue))

    async def retry(self) -> None:
        """Apply queued updates in order, stopping at the first that fails again."""
        while self._queue:
            if not await self._apply(self._queue[0]):
                break
            self._queue.popleft()
            self._metrics.usage_counter_queue.set(len(self._queue))

    def backlog_problem(self) -> str | None:
        """A readiness reason while the queue is full: the counters fall behind the ledger."""
        if len(self._queue) < self._max_queued:
            return None
        return f"{len(self._queue)} counter updates wait for the rate limiter"

    async def _apply(self, update: CounterUpdate) -> bool:
        try:
            workspace = await self._resolver.workspace(update.workspace_id)
            if workspace is None:
                return True  # deleted since: nothing left to charge
            limits = Limits(rpm=workspace.rpm, tpm=workspace.tpm)
            state = await self._limiter.record_usage(
                update.workspace_id,
                limits,
                period=update.period,
                tpm_delta=update.tpm_delta,
                tokens=update.tokens,
                spend_micros=update.spend_micros,
                operation_id=update.operation_id,
            )
            if not state.known:
                await self._restore_month(update, limits, state.missing)
        except (RateLimitUnavailable, StoreUnavailable) as error:
            self._metrics.reconciliations.labels("limiter_unavailable").inc()
            log.warning(
                "usage: counters of %s not updated yet, will retry: %s", update.workspace_id, error
            )
            return False
        return True

    async def _restore_month(
        self, update: CounterUpdate, limits: Limits, missing: frozenset[QuotaKind]
    ) -> None:
        """This call created the month's `missing` counters (Redis lost them, or a new process):
        add to those only what the ledger already holds, less the reports waiting here whose
        ledger rows are written (their counter updates add them, this one included). A counter
        that survived keeps its count. Only the replica whose increment created a counter gets
        here, and the Check path's seeding only fills counters that are absent.
        """
        workspace_id, period = update.workspace_id, update.period
        try:
            tokens, spend_micros = await month_from_ledger(self._store, workspace_id, period)
        except StoreUnavailable as error:
            log.warning(
                "usage: cannot restore %s %s from the ledger: %s", workspace_id, period, error
            )
            return
        waiting = [update, *(u for u in self._queue if u is not update)]
        for counted in waiting:
            same_month = (counted.workspace_id, counted.period) == (workspace_id, period)
            if same_month and self._in_ledger(counted.generation):
                tokens -= counted.tokens
                spend_micros -= counted.spend_micros
        tokens = max(0, tokens) if QuotaKind.TOKENS in missing else 0
        spend_micros = max(0, spend_micros) if QuotaKind.SPEND in missing else 0
        if tokens > 0 or spend_micros > 0:
            await self._limiter.record_usage(
                workspace_id,
                limits,
                period=period,
                tpm_delta=0,
                tokens=tokens,
                spend_micros=spend_micros,
            )
