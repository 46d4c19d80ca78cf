"""Restoring a month's quota counters from the ledger when the limiter has none.

Redis can lose counters (restart without persistence) and a new embedded process starts
empty. The first Check that finds no counter asks for a seed; it runs in the background,
once per workspace and period, and only fills counters that are still absent.
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

    def __init__(self, store: Store, limiter: RateLimiter) -> None:
        self._store = store
        self._limiter = limiter
        self._inflight: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._warnings = ThrottledLog(log)

    def request(self, workspace_id: str, period: str) -> None:
        key = (workspace_id, period)
        if key in self._inflight:
            return
        task = asyncio.get_running_loop().create_task(self.seed(workspace_id, period))
        self._inflight[key] = task
        task.add_done_callback(lambda _task: self._inflight.pop(key, None))

    async def seed(self, workspace_id: str, period: str) -> None:
        try:
            tokens, spend_micros = await month_from_ledger(self._store, workspace_id, period)
            await self._limiter.seed_usage(
                workspace_id, period=period, tokens=tokens, spend_micros=spend_micros
            )
        except (StoreUnavailable, RateLimitUnavailable) as error:
            self._warnings.warning(
                "seed", "quota: cannot seed %s %s yet: %s", workspace_id, period, error
            )


async def month_from_ledger(store: Store, workspace_id: str, period: str) -> tuple[int, int]:
    """(tokens, micro-USD) the ledger holds for a workspace in a `YYYY-MM` period."""
    start, end = period_bounds(period)
    tokens, spend_usd = await store.period_totals(workspace_id, start, end)
    return tokens, round(spend_usd * 1e6)
