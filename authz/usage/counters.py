"""The month's quota counters and the TPM bucket, charged once per usage report, eventually.

Each report becomes one `CounterUpdate` with its own operation id. A failed update (the rate
limiter unreachable, the workspace lookup failing) is queued and retried with the same id,
which the limiter's `record` step remembers: a call that ran although its reply was lost does
not count twice. The ledger is tallied apart and never waits for these.

The counters stay exact against the ledger through counter losses (`ratelimit.marks`): each
update names the ledger batch its report goes into (this replica's id and the tally's
generation), each written batch is folded in after it (`LedgerFolds`), and an update that finds
the month's counters missing waits for the seed (`QuotaSeeder`) and is then applied.
"""

from __future__ import annotations

import logging
import uuid
from collections import deque
from dataclasses import dataclass, field

from authz.metrics import Metrics
from authz.models import UsageRow
from authz.resolver import KeyResolver
from authz.store.base import LedgerMark, StoreUnavailable
from authz.usage.seeding import LedgerFolds, QuotaSeeder
from ratelimit.limiter import Limits, RateLimiter, RateLimitUnavailable, UsageTag
from ratelimit.marks import position

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
        limiter: RateLimiter,
        resolver: KeyResolver,
        metrics: Metrics,
        seeder: QuotaSeeder,
        max_queued: int = MAX_QUEUED_UPDATES,
    ) -> None:
        self._limiter = limiter
        self._resolver = resolver
        self._metrics = metrics
        self._seeder = seeder
        self._max_queued = max_queued
        self._queue: deque[CounterUpdate] = deque()
        self._replica_id = uuid.uuid4().hex
        """This process's name in the ledger marks: its generations are its own."""
        self._folds = LedgerFolds(
            limiter=limiter, seeder=seeder, replica_id=self._replica_id, metrics=metrics
        )

    def mark(self, generation: int, part: int | None = None) -> LedgerMark:
        """The mark of a ledger batch of `generation` (`part`: the row of a split batch)."""
        return LedgerMark(self._replica_id, position(generation, part))

    def written(self, rows: list[UsageRow], mark: LedgerMark) -> None:
        """The ledger holds a batch now: its amounts replace its reports' (at the next retry)."""
        self._folds.written(rows, mark)

    async def charge(self, update: CounterUpdate) -> None:
        """Apply now, or queue behind earlier failures (they are retried first)."""
        if self._queue or not await self._apply(update):
            self._queue.append(update)
            self._metrics.usage_counter_queue.set(len(self._queue))

    async def fold_written(self) -> None:
        """Fold the written batches into the counters (the rest wait for the next try)."""
        await self._folds.drain()

    async def retry(self) -> None:
        """Apply queued updates in order, stopping at the first that fails again; then the
        written batches' folds."""
        while self._queue:
            if not await self._apply(self._queue[0]):
                break
            self._queue.popleft()
            self._metrics.usage_counter_queue.set(len(self._queue))
        await self._folds.drain()

    def backlog_problem(self) -> str | None:
        """A readiness reason while the queue is full: the counters fall behind the ledger."""
        if len(self._queue) < self._max_queued:
            return self._folds.backlog_problem()
        return f"{len(self._queue)} counter updates wait for the rate limiter"

    async def _apply(self, update: CounterUpdate) -> bool:
        try:
            workspace = await self._resolver.workspace(update.workspace_id)
            if workspace is None:
                return True  # deleted since: nothing left to charge
            limits = Limits(rpm=workspace.rpm, tpm=workspace.tpm)
            for _ in range(2):
                state = await self._limiter.record_usage(
                    update.workspace_id,
                    limits,
                    period=update.period,
                    tpm_delta=update.tpm_delta,
                    tokens=update.tokens,
                    spend_micros=update.spend_micros,
                    operation_id=update.operation_id,
                    tag=UsageTag(self._replica_id, update.generation),
                )
                if state.known:
                    return True
                # The month's counters are missing: nothing was applied; seed, then repeat.
                await self._seeder.ensure(update.workspace_id, update.period)
            raise RateLimitUnavailable("the month's counters were lost again while seeding")
        except (RateLimitUnavailable, StoreUnavailable) as error:
            self._metrics.reconciliations.labels("limiter_unavailable").inc()
            log.warning(
                "usage: counters of %s not updated yet, will retry: %s", update.workspace_id, error
            )
            return False
