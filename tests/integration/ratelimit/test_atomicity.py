"""Atomicity under real contention: several OS processes hammer one workspace at once."""

from __future__ import annotations

import pytest

from ratelimit.keys import bucket_keys
from ratelimit.limiter import Limits
from ratelimit.redis_backend import RedisClient
from tests.integration.ratelimit.conftest import (
    GENEROUS_TIMEOUT_SECONDS,
    T0_MS,
    run_workers_together,
    worker_argv,
)
from tests.support.clocked_redis import ClockedRedisRateLimiter

pytestmark = pytest.mark.integration

PROCESSES = 3
REQUESTS_PER_PROCESS = 100


def burst_argv(url: str, workspace: str, limits: Limits, cost: int) -> list[str]:
    # A frozen clock: nothing refills, so the bucket's content is the cap.
    return worker_argv(
        "burst_worker", url, workspace, REQUESTS_PER_PROCESS, T0_MS, limits.rpm, limits.tpm, cost
    )


@pytest.mark.parametrize(
    ("limits", "cost", "admitted"),
    [
        (Limits(rpm=50, tpm=0), 0, 50),  # the request bucket is the limit
        (Limits(rpm=1000, tpm=500), 10, 50),  # the token bucket is the limit
    ],
)
async def test_processes_racing_on_one_workspace_get_exactly_the_capacity(
    redis_url: str,
    redis_client: RedisClient,
    workspace_id: str,
    limits: Limits,
    cost: int,
    admitted: int,
) -> None:
    counts = run_workers_together(
        [burst_argv(redis_url, workspace_id, limits, cost) for _ in range(PROCESSES)]
    )

    assert sum(c["failed"] for c in counts) == 0
    assert sum(c["admitted"] for c in counts) == admitted
    assert sum(c["denied"] for c in counts) == PROCESSES * REQUESTS_PER_PROCESS - admitted

    # All or nothing: the other bucket was debited exactly once per admitted request.
    limiter = ClockedRedisRateLimiter(
        redis_client, timeout_seconds=GENEROUS_TIMEOUT_SECONDS, clock_ms=lambda: T0_MS
    )
    after = await limiter.acquire(workspace_id, limits, 0)
    if limits.tpm:
        assert after.requests.remaining == limits.rpm - admitted - 1
        assert after.tokens.remaining == limits.tpm - admitted * cost
    assert await redis_client.exists(*bucket_keys(workspace_id)) == (2 if limits.tpm else 1)
