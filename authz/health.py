"""Readiness: per-component health folded into the Authorization service's serving status.

Service "" is liveness: SERVING while the process lives. Service
`envoy.service.auth.v3.Authorization` is readiness: SERVING only while the store answers and
the rate limiter answers (or AUTHZ_FAILURE_MODE=open makes it optional), and while the ledger's
retry queue has room.
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
        self._ready: bool | None = None

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
        if not limiter_ok:
            problems.append("rate limiter: unreachable")
        self._components = {"store": store_ok, "ratelimit": limiter_ok}
        for name, backlog in self._backlogs.items():
            reason = backlog()
            self._components[name] = reason is None
            if reason is not None:
                problems.append(f"{name}: {reason}")
        for component, ok in self._components.items():
            self._metrics.ready.labels(component).set(1 if ok else 0)
        ready = (
            store_ok
            and (limiter_ok or not self._limiter_required)
            and all(self._components[name] for name in self._backlogs)
        )
        if ready != self._ready:
            if ready:
                log.info("readiness: SERVING")
            else:
                log.warning("readiness: NOT_SERVING (%s)", "; ".join(problems))
            self._ready = ready
            await self._health.set(AUTHZ_SERVICE, SERVING if ready else NOT_SERVING)
        return ready

    async def run(self) -> None:
        while True:
            await self.probe()
            await asyncio.sleep(self._interval)

    async def shutdown(self) -> None:
        """Everything NOT_SERVING, liveness included, so load balancers drain us first."""
        await self._health.enter_graceful_shutdown()
