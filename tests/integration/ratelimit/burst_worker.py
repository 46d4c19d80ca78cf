"""A worker process for the atomicity test: fires N concurrent acquires at one workspace.

Run as `python -m tests.integration.ratelimit.burst_worker URL WORKSPACE N NOW_MS RPM TPM COST`.
It connects and loads the script, prints `ready`, waits for a line on stdin (so all workers
start together), fires, and prints one JSON line: {"admitted": k, "denied": d, "failed": f}.
"""

from __future__ import annotations

import asyncio
import json
import sys

from ratelimit.limiter import Limits, RateLimitUnavailable
from ratelimit.redis_backend import connect_redis
from tests.support.clocked_redis import ClockedRedisRateLimiter

TIMEOUT_SECONDS = 5.0
"""The point is atomicity under contention, not latency: no request may time out."""


async def burst(url: str, workspace: str, n: int, now_ms: int, limits: Limits, cost: int) -> None:
    client = connect_redis(url, timeout_seconds=TIMEOUT_SECONDS, max_connections=n)
    limiter = ClockedRedisRateLimiter(
        client, timeout_seconds=TIMEOUT_SECONDS, clock_ms=lambda: now_ms
    )
    try:
        # Load the scripts the burst uses (one per operation).
        await limiter.acquire(f"{workspace}-warmup", limits, 0)
        await limiter.adjust_tokens(f"{workspace}-warmup", limits, -1)
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

        async def one() -> str:
            try:
                result = await limiter.acquire(workspace, limits, cost)
            except RateLimitUnavailable:
                return "failed"
            return "admitted" if result.allowed else "denied"

        outcomes = await asyncio.gather(*(one() for _ in range(n)))
        counts = {kind: outcomes.count(kind) for kind in ("admitted", "denied", "failed")}
        print(json.dumps(counts), flush=True)
    finally:
        await limiter.close()


def main(argv: list[str]) -> None:
    url, workspace, n, now_ms, rpm, tpm, cost = argv
    asyncio.run(
        burst(url, workspace, int(n), int(now_ms), Limits(rpm=int(rpm), tpm=int(tpm)), int(cost))
    )


if __name__ == "__main__":
    main(sys.argv[1:])
