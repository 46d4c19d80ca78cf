"""Benchmark the Check hot path: a cached key plus the rate limiter.

Measures (1) the servicer alone, called in-process, and (2) Check over real gRPC on loopback,
with the embedded store and in-process buckets, or Redis when AUTHZ_BENCH_REDIS_URL is set.
Run with `make bench`; numbers go to stdout. Not part of the test suite.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc
from prometheus_client import CollectorRegistry

from authz.check import AuthorizationServicer
from authz.keys import mint_key
from authz.lastused import LastUsedRecorder
from authz.metrics import Metrics
from authz.models import CLI_ACTOR, NewWorkspace
from authz.resolver import KeyResolver
from authz.responses import AllowRenderer
from authz.store.dialect import Timeouts
from authz.store.sqlite import SqliteStore
from authz.usage.pricing import PriceTable
from authz.usage.seeding import QuotaSeeder
from ratelimit.limiter import RateLimiter
from ratelimit.memory import InMemoryRateLimiter
from ratelimit.redis_backend import RedisRateLimiter, connect_redis
from tests.support.checks import bearer, check_request

ITERATIONS = int(os.environ.get("BENCH_N", "20000"))
GRPC_ITERATIONS = int(os.environ.get("BENCH_GRPC_N", "5000"))
CONCURRENCY = 64
CONCURRENCY = 64


def _report(name: str, samples: list[float]) -> None:
    samples.sort()
    p50 = statistics.median(samples) * 1e6
    p99 = samples[int(len(samples) * 0.99)] * 1e6
    print(f"{name:<44} p50 {p50:8.1f} µs   p99 {p99:8.1f} µs   n={len(samples)}")


class _Context:
    async def abort(self, code: Any, details: str) -> None:
        raise RuntimeError(f"{code}: {details}")


async def main() -> None:
    folder = Path(tempfile.mkdtemp())
    store = SqliteStore(str(folder / "bench.db"), timeouts=Timeouts(read=1.0))
    await store.open()
    await store.migrate()
    workspace = await store.create_workspace(
        NewWorkspace(name="bench", rpm=10**9, tpm=10**9), actor=CLI_ACTOR
    )
    secret, new = mint_key(workspace.id, "bench")
    await store.create_key(new, actor=CLI_ACTOR)
    metrics = Metrics(CollectorRegistry())
    redis_url = os.environ.get("AUTHZ_BENCH_REDIS_URL")
    limiter: RateLimiter
    if redis_url:
        limiter = RedisRateLimiter(
            connect_redis(redis_url, timeout_seconds=0.05), metrics=metrics.limiter
        )
    else:
        limiter = InMemoryRateLimiter()
    backend = "redis" if redis_url else "in-process"
    servicer = AuthorizationServicer(
        resolver=KeyResolver(
            store,
            metrics,
            size=1000,
            ttl=600,
            negative_size=1000,
            negative_ttl=10,
            stale_if_error=0,
        ),
        limiter=limiter,
        metrics=metrics,
        renderer=AllowRenderer(keep_authorization=False),
        last_used=LastUsedRecorder(store, interval=60),
        prices=PriceTable(),
        seeder=QuotaSeeder(store, limiter),
        fail_open=False,
    )
    request = check_request(headers=bearer(secret), body=b'{"max_tokens": 10}')
    context: Any = _Context()
    await servicer.Check(request, context)  # warm the cache

    samples = []
    for _ in range(ITERATIONS if not redis_url else GRPC_ITERATIONS):
        started = time.perf_counter()
        await servicer.Check(request, context)
        samples.append(time.perf_counter() - started)
    _report(f"servicer.Check in-process ({backend} limiter)", samples)

    server = grpc.aio.server()
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        await stub.Check(request)
        samples = []
        for _ in range(GRPC_ITERATIONS):
            started = time.perf_counter()
            await stub.Check(request)
            samples.append(time.perf_counter() - started)
        _report(f"Check over gRPC loopback ({backend} limiter)", samples)
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one() -> None:
            async with gate:
                await stub.Check(request)

        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(GRPC_ITERATIONS)))
        elapsed = time.perf_counter() - started
        label = f"throughput, {CONCURRENCY} in flight"
        print(f"{label:<44} {GRPC_ITERATIONS / elapsed:8.0f} checks/s")
    await server.stop(None)
    await limiter.close()
    await store.close()


if __name__ == "__main__":
    asyncio.run(main())
