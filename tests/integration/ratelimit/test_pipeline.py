"""Implicit pipelining on a real standalone Redis: coalesced, exact, and NOSCRIPT-safe."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from ratelimit.limiter import Limits
from ratelimit.pipeline import ScriptPipeliner
from ratelimit.redis_backend import RedisRateLimiter, connect_redis
from tests.integration.ratelimit.conftest import GENEROUS_TIMEOUT_SECONDS
from tests.integration.ratelimit.test_redis_limiter import commandstats
from tests.support.redis_servers import RedisServer

pytestmark = pytest.mark.integration

CONCURRENT = 60
RPM = 40


async def _warm_limiter(client: Redis, workspace_id: str) -> RedisRateLimiter:
    """A pipelining limiter whose acquire script was loaded."""
    limiter = RedisRateLimiter(client, timeout_seconds=GENEROUS_TIMEOUT_SECONDS)
    await limiter.acquire(f"{workspace_id}-warm", Limits(rpm=RPM, tpm=0), 0)
    return limiter


async def _evalsha_connections(client: Redis) -> list[dict[str, str]]:
    """The server's connections whose last command was an EVALSHA (the limiter's calls)."""
    return [c for c in await client.client_list() if c["cmd"] == "evalsha"]


async def _burst(limiter: RedisRateLimiter, workspace_id: str) -> list[int]:
    """Remaining requests after each of CONCURRENT simultaneous acquires (-1: denied)."""
    results = await asyncio.gather(
        *(limiter.acquire(workspace_id, Limits(rpm=RPM, tpm=0), 0) for _ in range(CONCURRENT))
    )
    return [r.requests.remaining if r.allowed else -1 for r in results]


async def test_concurrent_calls_share_one_connection_and_stay_exact(
    own_client: Redis, workspace_id: str
) -> None:
    limiter = await _warm_limiter(own_client, workspace_id)
    await own_client.config_resetstat()
    remaining = await _burst(limiter, workspace_id)
    # Exactly the capacity, each admission seeing its own bucket level: one script call each.
    assert sorted(r for r in remaining if r >= 0) == list(range(RPM))
    assert remaining.count(-1) == CONCURRENT - RPM
    assert (await commandstats(own_client))["evalsha"] == (CONCURRENT, 0)
    # One write per loop tick: the burst needed one connection, not one per call in flight.
    # Counted as the connections whose last command was an EVALSHA: the limiter keeps its
    # connection between batches, so the client's other calls (these checks) take another.
    assert len(await _evalsha_connections(own_client)) == 1


async def test_noscript_inside_a_pipeline_reloads_once_and_costs_no_call(
    own_client: Redis, workspace_id: str
) -> None:
    limiter = await _warm_limiter(own_client, workspace_id)
    await own_client.script_flush()
    await own_client.config_resetstat()
    remaining = await _burst(limiter, workspace_id)
    assert sorted(r for r in remaining if r >= 0) == list(range(RPM))
    stats = await commandstats(own_client)
    assert stats["script|load"] == (1, 0)
    # The calls of the first pipeline met NOSCRIPT and ran again after the load; each call
    # ran exactly once (the rest, queued behind the in-flight bound, came after the load).
    calls, failed = stats["evalsha"]
    assert failed > 1
    assert calls - failed == CONCURRENT


async def test_pipelining_off_calls_one_by_one(own_client: Redis, workspace_id: str) -> None:
    limiter = RedisRateLimiter(
        own_client, timeout_seconds=GENEROUS_TIMEOUT_SECONDS, pipelining=False
    )
    remaining = await _burst(limiter, workspace_id)
    assert sorted(r for r in remaining if r >= 0) == list(range(RPM))
    assert (await own_client.info("clients"))["connected_clients"] > 1


async def test_close_gives_the_kept_connections_back_to_the_pool(own_redis: RedisServer) -> None:
    client = connect_redis(
        own_redis.url, timeout_seconds=GENEROUS_TIMEOUT_SECONDS, max_connections=2
    )
    assert isinstance(client, Redis)
    pool = client.connection_pool
    pipeliner = ScriptPipeliner(client)
    try:
        assert await pipeliner.evalsha(client.register_script("return 7"), [], []) == 7
        taken = await pool.get_connection()  # type: ignore[no-untyped-call]
        # The pipeliner kept the pool's other connection for its next batch...
        assert not pool.can_get_connection()
        await pipeliner.close()
        # ...and gives it back when closed.
        assert pool.can_get_connection()
        await pool.release(taken)
    finally:
        await client.aclose()
