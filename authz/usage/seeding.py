"""Restoring a month's quota counters from the ledger when the limiter has none.

Redis can lose counters (restart without persistence, eviction) and a new embedded process
starts empty. The limiter never admits on a missing counter (see `ratelimit.quota`): the Check
that finds one waits here for the seed, then asks again. One seed runs per workspace and period;
concurrent Checks of that workspace wait on it (singleflight), each for at most the database
timeout. The seed only fills counters that are still absent (SET NX).
"""

from __future__ import annotations

import asyncio
import logging

from authz.logs import ThrottledLog
from authz.store.base import Store, StoreUnavailable
from authz.usage.periods import period_bounds
from ratelimit.limiter import RateLimiter, RateLimitUnavailable

log = logging.getLogger(__name__)


class QuotaSeeder:
    """Seeds quota counters from the ledger, at most one seed in flight per workspace+period."""

    def __init__(self, store: Store, limiter: RateLimiter, *, timeout_s: float) -> None:
        self._store = store
        self._limiter = limiter
        self._timeout_s = timeout_s
        self._inflight: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._warnings = ThrottledLog(log)

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
        try:
            tokens, spend_micros = await month_from_ledger(self._store, workspace_id, period)
        except StoreUnavailable as error:
            self._warnings.warning(
                "seed", "quota: cannot seed %s %s from the ledger: %s", workspace_id, period, error
            )
            raise RateLimitUnavailable(f"ledger unavailable for seeding: {error}") from error
        await self._limiter.seed_usage(
            workspace_id, period=period, tokens=tokens, spend_micros=spend_micros
        )


async def month_from_ledger(store: Store, workspace_id: str, period: str) -> tuple[int, int]:
    """(tokens, micro-USD) the ledger holds for a workspace in a `YYYY-MM` period."""
    start, end = period_bounds(period)
    tokens, spend_usd = await store.period_totals(workspace_id, start, end)
    return tokens, round(spend_usd * 1e6)
