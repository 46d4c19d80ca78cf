"""The operations hash (keys.operations_key): a retried usage report counts once, and forgotten
operations are pruned, so the hash stays about as large as one minute of operations."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from ratelimit.keys import operations_key
from ratelimit.limiter import Limits, QuotaState
from ratelimit.redis_backend import OPERATION_TTL_SECONDS
from tests.integration.ratelimit.conftest import GENEROUS_TIMEOUT_SECONDS, FakeClockMs
from tests.support.clocked_redis import ClockedRedisRateLimiter

pytestmark = pytest.mark.integration

PERIOD = "2026-11"
LIMITS = Limits(rpm=0, tpm=1_000_000)


@pytest.fixture
async def limiter(
    own_client: Redis, clock_ms: FakeClockMs
) -> AsyncIterator[ClockedRedisRateLimiter]:
    limiter = ClockedRedisRateLimiter(
        own_client, timeout_seconds=GENEROUS_TIMEOUT_SECONDS, clock_ms=clock_ms
    )
    yield limiter
    await limiter.close()


async def report(limiter: ClockedRedisRateLimiter, workspace: str, operation: str) -> QuotaState:
    return await limiter.record_usage(
        workspace,
        LIMITS,
        period=PERIOD,
        tpm_delta=-1,
        tokens=1,
        spend_micros=2,
        operation_id=operation,
    )


async def test_forgotten_operations_are_pruned_and_live_ones_answered(
    limiter: ClockedRedisRateLimiter, own_client: Redis, clock_ms: FakeClockMs, workspace_id: str
) -> None:
    ops = operations_key(workspace_id)
    for i in range(300):
        await report(limiter, workspace_id, f"old-{i}")
    clock_ms.advance(OPERATION_TTL_SECONDS * 1000 - 1)
    first = await report(limiter, workspace_id, "old-0")  # a retry, one minute on: answered
    assert (first.tokens_used, first.spend_used_micros) == (1, 2)
    clock_ms.advance(1)
    for i in range(300):
        await report(limiter, workspace_id, f"new-{i}")
    # The pass that the hash's doubling started has deleted every operation past its minute.
    kept = await asyncio.gather(*(own_client.hexists(ops, f"old-{i}") for i in range(300)))
    assert not any(kept)
    assert await own_client.hlen(ops) <= 2 * 300 + 64 + 1
    total = await report(limiter, workspace_id, "new-7")  # live: answered, not counted again
    assert total.tokens_used == 300 + 8
    assert (await report(limiter, workspace_id, "last")).tokens_used == 601
    assert 0 < await own_client.ttl(ops) <= 40 * 24 * 3600
