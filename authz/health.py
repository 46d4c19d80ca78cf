"""Readiness: per-component health folded into the Authorization service's serving status.

Service "" is liveness: SERVING while the process lives. Service
`envoy.service.auth.v3.Authorization` is readiness: SERVING only while the store answers and
the rate limiter answers (or AUTHZ_FAILURE_MODE=open makes it optional), the ledger's retry
queue has room, the database pool has not run out of connections since the last probe, and
nothing has reported itself down through `report` (a crashed background task, for one).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]  # old stubs

from authz.metrics import Metrics
from authz.store.base import Store, StoreUnavailable
from ratelimit.limiter import RateLimiter

log = logging.getLogger(__name__)

AUTHZ_SERVICE = "envoy.service.auth.v3.Authorization"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class PoolWatch:
    """The PostgreSQL pool's use, as metrics and as a readiness reason while it is exhausted.

    Exhausted means a call gave up waiting for a connection since the previous probe: a
    request then got UNAVAILABLE (never a 401) for want of a connection. A full pool whose
    waiters are served in time is only busy, and stays ready: taking a replica out of the
    load balancer for a burst of cache misses would move the burst to its neighbours.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._size = 0
        self._gave_up = 0
        self._gave_up_at_last_probe = 0

    def sized(self, connections: int) -> None:
        self._size = connections
        self._metrics.db_pool_size.set(connections)

    def used(self, *, in_use: int, waiting: int) -> None:
        self._metrics.db_pool_in_use.set(in_use)
        self._metrics.db_pool_waiting.set(waiting)

    def waited(self, *, acquired: bool) -> None:
        if not acquired:
            self._gave_up += 1
        self._metrics.db_pool_waits.labels("acquired" if acquired else "gave_up").inc()

    def problem(self) -> str | None:
        """A reason while exhausted (calls gave up since the previous call), else None."""
        gave_up = self._gave_up - self._gave_up_at_last_probe
        self._gave_up_at_last_probe = self._gave_up
        if not gave_up:
            return None
        return (
            f"exhausted: {gave_up} call(s) gave up waiting for one of its {self._size} "
            "connections (AUTHZ_DB_POOL_SIZE, AUTHZ_DB_TIMEOUT_MS)"
        )


class Readiness:
    """Probes the store and the limiter and flips the Authorization service's status."""

    def __init__(
        self,
        health: health_aio.HealthServicer,
        *,
        store: Store,
        limiter: RateLimiter,
        metrics: Metrics,
        limiter_required: bool,
        interval: float,
        backlogs: Mapping[str, Callable[[], str | None]] | None = None,
    ) -> None:
        self._health = health
        self._store = store
        self._limiter = limiter
        self._metrics = metrics
        self._limiter_required = limiter_required
        self._interval = interval
        self._backlogs = dict(backlogs or {})
        """In-process components that can fill up (the ledger's retry queue): name → a reason
        while full, else None."""
        self._components = {"store": False, "ratelimit": False}
        self._probe_problems: list[str] = ["not probed yet"]
        self._reported: set[str] = set()
        self._ready: bool | None = None
        self._last_reported: list[str] = []

    async def probe(self) -> bool:
        """Probe every component once and publish the result."""
        problems = []
        try:
            await self._store.ping()
            store_ok = True
        except StoreUnavailable as error:
            store_ok = False
            problems.append(f"store: {error}")
        limiter_ok = await self._limiter.ping()
        if not limiter_ok and self._limiter_required:
            problems.append("rate limiter: unreachable")
        self._components = {"store": store_ok, "ratelimit": limiter_ok}
        for name, backlog in self._backlogs.items():
            reason = backlog()
            self._components[name] = reason is None
            if reason is not None:
                problems.append(f"{name}: {reason}")
        for component, ok in self._components.items():
            self._metrics.ready.labels(component).set(1 if ok else 0)
        self._probe_problems = problems
        return await self._publish()

    async def report(self, reason: str, *, ok: bool) -> None:
        """Mark `reason` down (NOT_SERVING, naming it) or back up, outside the probe loop."""
        if ok:
            self._reported.discard(reason)
        else:
            self._reported.add(reason)
        await self._publish()

    async def _publish(self) -> bool:
        reported = sorted(self._reported)
        problems = self._probe_problems + [f"{reason}: down" for reason in reported]
        ready = not problems
        # Log transitions, and each change in what reported itself down (not every probe).
        if ready != self._ready or reported != self._last_reported:
            if ready:
                log.info("readiness: SERVING")
            else:
                log.warning("readiness: NOT_SERVING (%s)", "; ".join(problems))
        if ready != self._ready:
            await self._health.set(AUTHZ_SERVICE, SERVING if ready else NOT_SERVING)
        self._ready = ready
        self._last_reported = reported
        return ready

    async def run(self) -> None:
        while True:
            await self.probe()
            await asyncio.sleep(self._interval)

    async def shutdown(self) -> None:
        """Everything NOT_SERVING, liveness included, so load balancers drain us first."""
        await self._health.enter_graceful_shutdown()
