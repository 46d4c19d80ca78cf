"""A worker process for the usage atomicity test: fires N concurrent record_usage calls.

Run as `python -m tests.integration.ratelimit.usage_worker URL WORKSPACE PERIOD N NOW_MS TPM`.
Call i (0-based) records tokens i+1, spend 1000*(i+1) micro-USD and a TPM refund of 1, so the
exact totals are known. It connects and loads the script, prints `ready`, waits for a line on
stdin (so all workers start together), fires, and prints one JSON line:
{"recorded": k, "failed": f}.
"""

from __future__ import annotations

import asyncio
import json
import sys

from ratelimit.limiter import Limits, RateLimitUnavailable
from ratelimit.redis_backend import connect_redis
from tests.support.clocked_redis import ClockedRedisRateLimiter

TIMEOUT_SECONDS = 5.0
"""The point is atomicity under contention, not latency: no call may time out."""


async def burst(url: str, workspace: str, period: str, n: int, now_ms: int, tpm: int) -> None:
    client = connect_redis(url, timeout_seconds=TIMEOUT_SECONDS, max_connections=n)
    limiter = ClockedRedisRateLimiter(
        client, timeout_seconds=TIMEOUT_SECONDS, clock_ms=lambda: now_ms
    )
    limits = Limits(rpm=0, tpm=tpm)
    try:
        await limiter.seed_usage(f"{workspace}-warmup", period=period, tokens=0, spend_micros=0)
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

        async def one(i: int) -> str:
            try:
                await limiter.record_usage(
                    workspace,
                    limits,
                    period=period,
                    tpm_delta=-1,
                    tokens=i + 1,
                    spend_micros=1000 * (i + 1),
                )
            except RateLimitUnavailable:
                return "failed"
            return "recorded"

        outcomes = await asyncio.gather(*(one(i) for i in range(n)))
        counts = {kind: outcomes.count(kind) for kind in ("recorded", "failed")}
        print(json.dumps(counts), flush=True)
    finally:
        await limiter.close()


def main(argv: list[str]) -> None:
    url, workspace, period, n, now_ms, tpm = argv
    asyncio.run(burst(url, workspace, period, int(n), int(now_ms), int(tpm)))


if __name__ == "__main__":
    main(sys.argv[1:])
