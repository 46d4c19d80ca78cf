"""At most one ledger write per interval, however many messages Envoy streams in between.

Each write is a transaction (a few hundred µs of CPU on SQLite, round trips on PostgreSQL);
under load Envoy sends a message per 16 KiB of entries, many times a second per stream. Writes
are paced to Envoy's own buffering interval instead: a message inside the window is tallied in
memory and written with the others at its end, so a hard kill loses at most one interval of
entries, the same window Envoy itself holds them in its buffer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

WRITE_EVERY_S = 0.2
"""Envoy's `buffer_flush_interval` in the shipped configs."""


class PacedWrites:
    """Calls `write` now if the last call was `interval` ago or more, else once when the
    interval is over (one pending call covers every request made meanwhile)."""

    def __init__(
        self,
        write: Callable[[], Awaitable[None]],
        *,
        interval: float = WRITE_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._write = write
        self._interval = interval
        self._clock = clock
        self._last = -interval
        self._pending: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def soon(self) -> None:
        """Write what is held, now or at the end of the current interval."""
        if self._pending is not None:
            return  # already due at the end of the interval
        wait = self._last + self._interval - self._clock()
        if wait <= 0:
            await self.now()
            return
        self._pending = asyncio.get_running_loop().call_later(wait, self._start)

    async def now(self) -> None:
        """Write what is held, now (the stream ends)."""
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        self._last = self._clock()
        await self._write()

    def _start(self) -> None:
        self._pending = None
        task = asyncio.get_running_loop().create_task(self.now())
        # Keep a reference until done: the loop holds tasks only weakly.
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The write keeps what failed for the next one; say why this one did not.
            log.error("usage: a paced write failed", exc_info=task.exception())
