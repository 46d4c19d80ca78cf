"""Batched `last_used_at`: the Check path records in memory, a background task writes.

A write per request would put the database on the hot path; instead one UPDATE per flush
interval covers every key seen since the last one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

from authz.store.base import Store, StoreUnavailable

log = logging.getLogger(__name__)


class LastUsedRecorder:
    """Remembers the latest use of each key and flushes them in one batch."""

    def __init__(
        self, store: Store, *, interval: float, clock: Callable[[], float] = time.time
    ) -> None:
        self._store = store
        self._interval = interval
        self._clock = clock
        self._pending: dict[str, float] = {}

    def touch(self, key_id: str) -> None:
        self._pending[key_id] = self._clock()

    async def flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, {}
        try:
            await self._store.record_key_use(
                {key_id: datetime.fromtimestamp(at, UTC) for key_id, at in batch.items()}
            )
        except StoreUnavailable as error:
            log.warning("last_used_at: flush of %d keys failed, will retry: %s", len(batch), error)
            for key_id, at in batch.items():
                self._pending[key_id] = max(at, self._pending.get(key_id, at))

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.flush()
