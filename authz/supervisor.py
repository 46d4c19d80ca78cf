"""Background jobs that are restarted when they crash, with readiness down while they are.

A crashed change feed means revocations stop arriving; a crashed ledger writer means usage
stops being written. Either is worse than a replica taken out of rotation, so while a job is
down the Authorization service reports NOT_SERVING (naming the job) until it runs again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from authz.health import Readiness
from authz.metrics import Metrics

log = logging.getLogger(__name__)

Job = Callable[[], Coroutine[Any, Any, None]]
Sleep = Callable[[float], Awaitable[None]]


class Supervisor:
    """Runs each named job forever, restarting it with exponential backoff after a crash."""

    def __init__(
        self,
        *,
        readiness: Readiness,
        metrics: Metrics,
        backoff_s: float = 0.1,
        max_backoff_s: float = 10.0,
        sleep: Sleep = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        recancel_s: float = 0.1,
    ) -> None:
        self._readiness = readiness
        self._metrics = metrics
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._sleep = sleep
        self._clock = clock
        self._recancel_s = recancel_s
        self.tasks: list[asyncio.Task[None]] = []

    def start(self, name: str, job: Job) -> asyncio.Task[None]:
        self._metrics.task_up.labels(name).set(1)
        self._metrics.task_restarts.labels(name)
        task = asyncio.create_task(self._supervise(name, job), name=name)
        self.tasks.append(task)
        return task

    async def stop(self) -> None:
        """Cancel every job, again and again until each has ended.

        Once is not enough on Python 3.11: a cancellation that lands as an inner
        `asyncio.wait_for` completes is lost (CPython gh-86296, fixed in 3.12), and redis-py
        writes every command under `wait_for`. Seen: readiness's Redis PING swallowed the
        cancellation when SIGTERM came right after start-up, its loop ran on, and shutdown
        waited for it forever.
        """
        pending = {task for task in self.tasks if not task.done()}
        while pending:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=self._recancel_s)
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _supervise(self, name: str, job: Job) -> None:
        delay = self._backoff_s
        while True:
            started = self._clock()
            try:
                await job()
                log.error("background task %s stopped unexpectedly; restarting", name)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("background task %s crashed; restarting in %.1fs", name, delay)
            self._metrics.task_up.labels(name).set(0)
            self._metrics.task_restarts.labels(name).inc()
            await self._readiness.report(f"background task {name}", ok=False)
            if self._clock() - started > self._max_backoff_s:
                # It ran for a while before failing: a new failure, not a crash loop.
                delay = self._backoff_s
            await self._sleep(delay)
            delay = min(delay * 2, self._max_backoff_s)
            self._metrics.task_up.labels(name).set(1)
            await self._readiness.report(f"background task {name}", ok=True)
