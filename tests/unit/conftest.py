"""The real app, built by `authz.app.build` with fakes at the Protocol boundaries."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc

from authz.app import App, build
from authz.lastused import LastUsedRecorder
from authz.metrics import Metrics
from authz.resolver import KeyResolver
from authz.server import Running, start
from authz.settings import Settings
from authz.tracing import Tracing
from ratelimit.limiter import RateLimiter
from ratelimit.memory import InMemoryRateLimiter
from tests.support.clock import FakeClock
from tests.support.fakes import FakeStore


@dataclass
class Sidecar:
    stub: external_auth_pb2_grpc.AuthorizationStub
    address: str
    store: FakeStore
    metrics: Metrics
    clock: FakeClock[float]
    resolver: KeyResolver
    last_used: LastUsedRecorder


@dataclass
class Started:
    app: App
    running: Running
    channel: grpc.aio.Channel

    async def stop(self) -> None:
        await self.channel.close(None)
        await self.app.server.stop(None)
        for task in self.running.background:
            task.cancel()
        await asyncio.gather(*self.running.background, return_exceptions=True)


UNIT_SETTINGS = Settings(
    grpc_addr="127.0.0.1:0",
    cache_size=100,
    cache_ttl_s=60,
    negative_cache_size=100,
    negative_cache_ttl_s=10,
    last_used_flush_s=60,
    health_interval_s=60,
)


async def start_sidecar(
    *,
    keep_authorization: bool = False,
    fail_open: bool = False,
    limiter: RateLimiter | None = None,
    tracing: Tracing | None = None,
    clock: FakeClock[float] | None = None,
) -> tuple[Sidecar, Started]:
    store = FakeStore()
    await store.migrate()  # as `authz migrate` would: the reservation-signing key
    # One clock moves the cache, grace deadlines, last_used_at and the buckets together.
    clock = clock or FakeClock(1000.0)
    settings = replace(
        UNIT_SETTINGS,
        keep_authorization=keep_authorization,
        failure_mode="open" if fail_open else "closed",
    )
    app = await build(
        settings,
        store=store,
        limiter=InMemoryRateLimiter(clock_ms=clock.ms) if limiter is None else limiter,
        clock=clock,
        tracing=tracing or Tracing(),
    )
    running = await start(app, serve_metrics=False)
    address = f"127.0.0.1:{running.grpc_port}"
    channel = grpc.aio.insecure_channel(address)
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)
    sidecar = Sidecar(stub, address, store, app.metrics, clock, app.resolver, app.last_used)
    return sidecar, Started(app, running, channel)


@pytest.fixture
async def sidecar() -> AsyncIterator[Sidecar]:
    running, started = await start_sidecar()
    yield running
    await started.stop()
