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

from authz.app import build
from authz.keys import mint_key
from authz.models import CLI_ACTOR, NewWorkspace
from authz.server import start, stop
from authz.settings import Settings
from tests.support.checks import bearer, check_request

ITERATIONS = int(os.environ.get("BENCH_N", "20000"))
GRPC_ITERATIONS = int(os.environ.get("BENCH_GRPC_N", "5000"))
CONCURRENCY = 64


# What Envoy sends with a small chat completion (the shipped config): the pseudo-headers, the
# proxy's own, a client's usual ones, and a body of a few hundred bytes.
ENVOY_HEADERS = {
    ":authority": "api.example.com",
    ":scheme": "http",
    "content-type": "application/json",
    "content-length": "180",
    "user-agent": "OpenAI/Python 1.54.0",
    "accept": "application/json",
    "x-stainless-lang": "python",
    "x-stainless-package-version": "1.54.0",
    "x-forwarded-proto": "http",
    "x-request-id": "0d3f9a4e-7c1b-4f7e-9a55-5c1c2e9b1a77",
    "x-envoy-expected-rq-timeout-ms": "300000",
}
BODY = (
    b'{"model": "demo-model", "max_tokens": 10, "messages": [{"role": "system", "content": '
    b'"You are terse."}, {"role": "user", "content": "Say hello in five words, please."}]}'
)


def _report(name: str, samples: list[float], cpu_s: float | None = None) -> None:
    samples.sort()
    p50 = statistics.median(samples) * 1e6
    p99 = samples[int(len(samples) * 0.99)] * 1e6
    cpu = "" if cpu_s is None else f"   CPU {cpu_s / len(samples) * 1e6:7.1f} µs/Check"
    print(f"{name:<44} p50 {p50:8.1f} µs   p99 {p99:8.1f} µs{cpu}   n={len(samples)}")


class _Context:
    """A call without a deadline: never shed."""

    async def abort(self, code: Any, details: str) -> None:
        raise RuntimeError(f"{code}: {details}")

    def time_remaining(self) -> float | None:
        return None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()


async def main() -> None:
    folder = Path(tempfile.mkdtemp())
    redis_url = os.environ.get("AUTHZ_BENCH_REDIS_URL")
    backend = "redis" if redis_url else "in-process"
    # The production wiring, with the benchmark's store and a cache that outlives the run.
    settings = Settings(
        database_url=f"sqlite:///{folder / 'bench.db'}",
        redis_url=redis_url,
        grpc_addr="127.0.0.1:0",
        cache_size=1000,
        cache_ttl_s=600,
        negative_cache_size=1000,
        stale_if_error_s=0,
        last_used_flush_s=60,
    )
    app = await build(settings)
    workspace = await app.store.create_workspace(
        NewWorkspace(name="bench", rpm=10**9, tpm=10**9), actor=CLI_ACTOR
    )
    secret, new = mint_key(workspace.id, "bench")
    await app.store.create_key(new, actor=CLI_ACTOR)
    servicer = app.authorization
    request = check_request(headers={**ENVOY_HEADERS, **bearer(secret)}, body=BODY)
    context: Any = _Context()
    await servicer.Check(request, context)  # warm the cache

    samples = []
    cpu_started = time.process_time()
    for _ in range(ITERATIONS if not redis_url else GRPC_ITERATIONS):
        started = time.perf_counter()
        await servicer.Check(request, context)
        samples.append(time.perf_counter() - started)
    _report(
        f"servicer.Check in-process ({backend} limiter)",
        samples,
        time.process_time() - cpu_started,
    )

    running = await start(app, serve_metrics=False)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.grpc_port}") as channel:
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
    await stop(app, running, drain_delay_s=0, grace_s=0)


if __name__ == "__main__":
    asyncio.run(main())
