"""Acquire latency (p50/p99) and throughput of the in-memory and Redis rate limiters.

    python bench/bench_ratelimit.py [--redis-url redis://127.0.0.1:6379/0] [--requests N]
                                    [--concurrency C]

Latency is measured one call at a time (what a single Check pays); throughput with C
concurrent callers on one event loop (what one sidecar process can push). The Redis keys it
writes expire on their own within seconds. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

from ratelimit.limiter import Limits, RateLimiter, RateLimitUnavailable
from ratelimit.memory import InMemoryRateLimiter
from ratelimit.redis_backend import RedisRateLimiter, connect_redis

LIMITS = Limits(rpm=10**9, tpm=10**9)
"""Large enough that every call is admitted and debits both buckets: the full script path."""
TOKENS = 500
BENCH_TIMEOUT_SECONDS = 1.0


async def latencies(limiter: RateLimiter, requests: int) -> list[float]:
    workspace = f"bench-{uuid.uuid4().hex}"
    samples = []
    for _ in range(requests):
        started = time.perf_counter()
        await limiter.acquire(workspace, LIMITS, TOKENS)
        samples.append(time.perf_counter() - started)
    return samples


async def throughput(limiter: RateLimiter, requests: int, concurrency: int) -> float:
    per_worker = max(1, requests // concurrency)

    async def worker(index: int) -> None:
        workspace = f"bench-{uuid.uuid4().hex}-{index % 8}"
        for _ in range(per_worker):
            await limiter.acquire(workspace, LIMITS, TOKENS)

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return per_worker * concurrency / (time.perf_counter() - started)


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def run(name: str, limiter: RateLimiter, requests: int, concurrency: int) -> None:
    await latencies(limiter, min(requests, 200))  # warm-up: connections, script load
    cpu = time.process_time()
    samples = await latencies(limiter, requests)
    cpu_one = (time.process_time() - cpu) / requests
    cpu = time.process_time()
    rate = await throughput(limiter, requests, concurrency)
    cpu_many = (time.process_time() - cpu) / requests
    # CPU per acquire (this process only) is what a shared machine measures reliably; the
    # wall-clock figures move with whatever else runs.
    print(
        f"{name:>10}: p50 {percentile(samples, 0.5) * 1e6:8.1f} us   "
        f"p99 {percentile(samples, 0.99) * 1e6:8.1f} us   "
        f"mean {statistics.fmean(samples) * 1e6:8.1f} us   "
        f"{rate:10.0f} acquires/s with {concurrency} concurrent   "
        f"CPU/acquire {cpu_one * 1e6:6.1f} us one at a time, {cpu_many * 1e6:6.1f} us concurrent"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()

    await run("in-memory", InMemoryRateLimiter(), args.requests, args.concurrency)

    client = connect_redis(
        args.redis_url, timeout_seconds=BENCH_TIMEOUT_SECONDS, max_connections=args.concurrency
    )
    redis = RedisRateLimiter(client, timeout_seconds=BENCH_TIMEOUT_SECONDS)
    try:
        if not await redis.ping():
            print(f"{'redis':>10}: not reachable at {args.redis_url}, skipped")
            return
        await run("redis", redis, args.requests, args.concurrency)
    except RateLimitUnavailable as exc:
        print(f"{'redis':>10}: failed: {exc}")
    finally:
        await redis.close()


if __name__ == "__main__":
    asyncio.run(main())
