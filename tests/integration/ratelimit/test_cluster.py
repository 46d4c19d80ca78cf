"""The bucket script on a real 3-master Redis Cluster, reached through a redis+cluster:// URL."""

from __future__ import annotations

import math

import pytest
from redis.asyncio.cluster import RedisCluster

from ratelimit.keys import bucket_keys, operations_key, script_keys
from ratelimit.limiter import LimitKind, Limits, Quota
from ratelimit.memory import InMemoryRateLimiter
from ratelimit.redis_backend import RedisRateLimiter
from tests.integration.ratelimit.conftest import GENEROUS_TIMEOUT_SECONDS, FakeClockMs
from tests.support.clocked_redis import ClockedRedisRateLimiter
from tests.support.redis_servers import RedisClusterServers, send_command

pytestmark = pytest.mark.integration


async def test_all_keys_of_a_workspace_share_a_slot(cluster_client: RedisCluster) -> None:
    for workspace in ("a", "ws_1", "x}y{z", "ünïcode"):
        keys = (*script_keys(workspace, "2025-03"), operations_key(workspace))
        assert keys[:2] == bucket_keys(workspace)
        assert len({cluster_client.keyslot(key) for key in keys}) == 1


async def test_contract_example_on_the_cluster_clock(
    cluster_client: RedisCluster, workspace_id: str
) -> None:
    limiter = RedisRateLimiter(cluster_client, timeout_seconds=GENEROUS_TIMEOUT_SECONDS)
    for _ in range(5):
        assert (await limiter.acquire(workspace_id, Limits(rpm=5, tpm=1000), 10)).allowed
    denied = await limiter.acquire(workspace_id, Limits(rpm=5, tpm=1000), 10)
    assert denied.denied_by is LimitKind.REQUESTS
    assert math.ceil(denied.retry_after_seconds) == 12
    assert await limiter.ping()


async def test_workspaces_on_every_node_match_the_python_maths(
    cluster: RedisClusterServers, cluster_client: RedisCluster, workspace_id: str
) -> None:
    clock = FakeClockMs()
    redis = ClockedRedisRateLimiter(
        cluster_client, timeout_seconds=GENEROUS_TIMEOUT_SECONDS, clock_ms=clock
    )
    memory = InMemoryRateLimiter(clock_ms=clock)
    limits = Limits(rpm=3, tpm=100)
    quota = Quota(period="2025-03", token_quota=100, spend_cap_micros=250)
    workspaces = [f"{workspace_id}-{i}" for i in range(30)]
    for step in range(5):
        clock.advance(7_000 * step)
        for workspace in workspaces:
            assert await redis.acquire(workspace, limits, 30) == await memory.acquire(
                workspace, limits, 30
            )
            await redis.adjust_tokens(workspace, limits, -5)
            await memory.adjust_tokens(workspace, limits, -5)
            checked = [
                await limiter.acquire(workspace, limits, 20, quota=quota, spend_micros=40)
                for limiter in (redis, memory)
            ]
            assert checked[0] == checked[1]
            recorded = [
                await limiter.record_usage(
                    workspace, limits, period="2025-03", tpm_delta=3, tokens=25, spend_micros=60
                )
                for limiter in (redis, memory)
            ]
            assert recorded[0] == recorded[1]
    # Every workspace ran into its quota part-way through.
    assert checked[0].quota_exceeded is not None
    # 30 workspaces spread over the slot ranges: every master served some of them.
    for node in cluster.nodes:
        assert int(send_command(node.port, "DBSIZE")[1:]) > 0


async def test_script_flush_on_every_node_costs_no_request(
    cluster: RedisClusterServers, cluster_client: RedisCluster, workspace_id: str
) -> None:
    limiter = RedisRateLimiter(cluster_client, timeout_seconds=GENEROUS_TIMEOUT_SECONDS)
    limits = Limits(rpm=1000, tpm=0)
    workspaces = [f"{workspace_id}-{i}" for i in range(12)]
    for workspace in workspaces:
        assert (await limiter.acquire(workspace, limits, 0)).allowed
    for node in cluster.nodes:
        assert send_command(node.port, "SCRIPT", "FLUSH").startswith(b"+OK")
    for workspace in workspaces:
        assert (await limiter.acquire(workspace, limits, 0)).allowed
