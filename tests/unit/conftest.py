"""A real in-process gRPC server around the servicer, with fakes at the Protocol boundaries."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc
from prometheus_client import CollectorRegistry

from authz.check import AuthorizationServicer
from authz.lastused import LastUsedRecorder
from authz.metrics import Metrics
from authz.resolver import KeyResolver
from authz.responses import AllowRenderer
from authz.usage.pricing import PriceTable
from authz.usage.seeding import QuotaSeeder
from ratelimit.limiter import RateLimiter
from ratelimit.memory import InMemoryRateLimiter
from tests.support.fakes import FakeStore


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Sidecar:
    stub: external_auth_pb2_grpc.AuthorizationStub
    address: str
    store: FakeStore
    metrics: Metrics
    clock: ManualClock
    limiter_clock_ms: list[int]
    resolver: KeyResolver
    last_used: LastUsedRecorder


async def start_sidecar(
    *, keep_authorization: bool = False, fail_open: bool = False, limiter: RateLimiter | None = None
) -> tuple[Sidecar, grpc.aio.Server, grpc.aio.Channel]:
    store = FakeStore()
    metrics = Metrics(CollectorRegistry())
    clock = ManualClock()
    limiter_now = [10_000_000]
    resolver = KeyResolver(
        store,
        metrics,
        size=100,
        ttl=60,
        negative_size=100,
        negative_ttl=10,
        stale_if_error=900,
        clock=clock,
    )
    last_used = LastUsedRecorder(store, interval=60, clock=clock)
    prices = PriceTable()
    chosen = limiter or InMemoryRateLimiter(clock_ms=lambda: limiter_now[0])
    servicer = AuthorizationServicer(
        resolver=resolver,
        limiter=chosen,
        prices=prices,
        seeder=QuotaSeeder(store, chosen),
        metrics=metrics,
        renderer=AllowRenderer(keep_authorization=keep_authorization),
        last_used=last_used,
        fail_open=fail_open,
        wall_clock=clock,
    )
    server = grpc.aio.server()
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    address = f"127.0.0.1:{port}"
    channel = grpc.aio.insecure_channel(address)
    stub = external_auth_pb2_grpc.AuthorizationStub(channel)
    running = Sidecar(stub, address, store, metrics, clock, limiter_now, resolver, last_used)
    return running, server, channel


@pytest.fixture
async def sidecar() -> AsyncIterator[Sidecar]:
    running, server, channel = await start_sidecar()
    yield running
    await channel.close(None)
    await server.stop(None)
