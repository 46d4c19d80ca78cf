"""Restoring a month's quota counters from the ledger when the limiter has none.

Redis can lose counters (restart without persistence, eviction) and a new embedded process
starts empty. The limiter never admits on a missing counter (see `ratelimit.quota`): the Check
that finds one waits here for the seed, then asks again; so does a usage report whose counters
are missing (`authz.usage.counters`). One seed runs per workspace and period in a process;
concurrent callers wait on it (singleflight), each for at most the database timeout.

The seed is exact while other replicas keep reporting and flushing (`ratelimit.marks`): it
holds the month in the limiter under a token, reads a ledger snapshot with the batch marks it
includes, and installs it only if the hold survived; the batches written after the snapshot
reach the counters by their folds (`LedgerFolds`), never twice.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import deque
from dataclasses import dataclass

from authz.logs import ThrottledLog
from authz.metrics import Metrics
from authz.models import UsageRow
from authz.store.base import LedgerMark, Store, StoreUnavailable
from authz.store.sql_ledger import months_of
from authz.usage.periods import period_of
from ratelimit.limiter import RateLimiter, RateLimitUnavailable
from ratelimit.marks import Folded, SeedStart

log = logging.getLogger(__name__)

BUSY_POLL_S = 0.02
"""How often a seeder that finds another replica's seed under way looks whether it is done."""

DEFAULT_SEED_TIMEOUT_S = 5.0
"""How long a seed may take when the caller names no timeout (the sidecar passes its database
timeout)."""

MAX_QUEUED_FOLDS = 100_000
"""Folds held for retry while the limiter is unreachable, before readiness fails."""


def micros(spend_usd: float) -> int:
    """The ledger's USD as the counters' micro-USD: one rounding for snapshots and folds."""
    return round(spend_usd * 1e6)


class QuotaSeeder:
    """Seeds quota counters from the ledger, at most one seed in flight per workspace+period."""

    def __init__(self, store: Store, limiter: RateLimiter, *, timeout_s: float) -> None:
        self._store = store
        self._limiter = limiter
        self._timeout_s = timeout_s
        self._inflight: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._warnings = ThrottledLog(log)
        self._token = uuid.uuid4().hex
        """This seeder's name on the months it holds. One seed per month runs here at a time,
        so a seed after a failed one resumes that one's hold instead of waiting it out."""

    async def ensure(self, workspace_id: str, period: str) -> None:
        """Return once the period's counters are seeded; raise RateLimitUnavailable when the
        ledger or the limiter cannot answer within the database timeout.

        The seed is shared: a waiter that gives up (its timeout, its Check cancelled) leaves it
        running for the others.
        """
        key = (workspace_id, period)
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._seed(workspace_id, period))
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._finished(key, done))
        try:
            async with asyncio.timeout(self._timeout_s):
                await asyncio.shield(task)
        except TimeoutError as error:
            raise RateLimitUnavailable(
                f"quota counters of {workspace_id} {period} not seeded within "
                f"{self._timeout_s * 1000:.0f} ms"
            ) from error

    def _finished(self, key: tuple[str, str], task: asyncio.Task[None]) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved here too: every waiter may have timed out already

    async def _seed(self, workspace_id: str, period: str) -> None:
        """Hold, snapshot, install; start over when the hold was lost (the month lost again,
        or the hold expired). Bounded like its waiters, plus the hold."""
        hold_ms = max(1000, round(self._timeout_s * 2000))
        try:
            async with asyncio.timeout(self._timeout_s + hold_ms / 1000):
                while not await self._attempt(workspace_id, period, self._token, hold_ms):
                    pass
        except TimeoutError as error:
            raise RateLimitUnavailable(f"seeding {workspace_id} {period} timed out") from error

    async def _attempt(self, workspace_id: str, period: str, token: str, hold_ms: int) -> bool:
        start = await self._limiter.begin_seed(
            workspace_id, period=period, token=token, hold_ms=hold_ms
        )
        if start is SeedStart.COMPLETE:
            return True
        if start is SeedStart.BUSY:
            await asyncio.sleep(BUSY_POLL_S)  # another replica's seed: it ends or its hold does
            return False
        try:
            snapshot = await self._store.ledger_snapshot(workspace_id, period)
        except StoreUnavailable as error:
            self._warnings.warning(
                "seed", "quota: cannot seed %s %s from the ledger: %s", workspace_id, period, error
            )
            raise RateLimitUnavailable(f"ledger unavailable for seeding: {error}") from error
        return await self._limiter.finish_seed(
            workspace_id,
            period=period,
            token=token,
            tokens=snapshot.tokens,
            spend_micros=micros(snapshot.spend_usd),
            snapshot_marks=snapshot.marks,
        )


@dataclass(frozen=True, slots=True)
class Fold:
    """One written batch's amounts for one workspace and period."""

    workspace_id: str
    period: str
    position: int
    tokens: int
    spend_micros: int


def folds_of(rows: list[UsageRow], position: int) -> list[Fold]:
    """The folds of a batch written at `position`: one per month its rows touch."""
    folds = []
    for workspace_id, period in months_of(rows):
        mine = [r for r in rows if r.workspace_id == workspace_id and period_of(r.hour) == period]
        folds.append(
            Fold(
                workspace_id,
                period,
                position,
                sum(r.tokens for r in mine),
                micros(sum(r.spend_usd for r in mine)),
            )
        )
    return folds


class LedgerFolds:
    """Tells the limiter about each written batch, in write order, retrying until it is told.

    A fold that finds no month seeds it first (a snapshot, then this fold: above the snapshot's
    mark it adds, at or below it does nothing). Folds of one replica must reach the limiter in
    position order, so the queue is strictly first in, first out.
    """

    def __init__(
        self,
        *,
        limiter: RateLimiter,
        seeder: QuotaSeeder,
        replica_id: str,
        metrics: Metrics,
        max_queued: int = MAX_QUEUED_FOLDS,
    ) -> None:
        self._limiter = limiter
        self._metrics = metrics
        self._seeder = seeder
        self._replica_id = replica_id
        self._max_queued = max_queued
        self._queue: deque[Fold] = deque()

    def written(self, rows: list[UsageRow], mark: LedgerMark) -> None:
        """Queue the folds of a batch the ledger now holds."""
        self._queue.extend(folds_of(rows, mark.position))
        self._metrics.usage_fold_queue.set(len(self._queue))

    async def drain(self) -> None:
        """Apply queued folds in order, stopping at the first that fails (kept for next time)."""
        while self._queue:
            try:
                await self._apply(self._queue[0])
            except (RateLimitUnavailable, StoreUnavailable) as error:
                log.warning("usage: ledger fold not applied yet, will retry: %s", error)
                return
            self._queue.popleft()
            self._metrics.usage_fold_queue.set(len(self._queue))

    def backlog_problem(self) -> str | None:
        if len(self._queue) < self._max_queued:
            return None
        return f"{len(self._queue)} ledger folds wait for the rate limiter"

    async def _apply(self, fold: Fold) -> None:
        for _ in range(2):
            folded = await self._limiter.fold_ledger(
                fold.workspace_id,
                period=fold.period,
                replica_id=self._replica_id,
                position=fold.position,
                tokens=fold.tokens,
                spend_micros=fold.spend_micros,
            )
            if folded is not Folded.MISSING:
                return
            await self._seeder.ensure(fold.workspace_id, fold.period)
        raise RateLimitUnavailable(f"month {fold.workspace_id} {fold.period} lost again")
