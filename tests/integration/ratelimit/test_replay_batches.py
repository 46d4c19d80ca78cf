"""The replay check of a whole access-log message at once, on real Redis and a cluster."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis, RedisCluster

from authz.usage.replay import RedisReplayGuard, ReplayCheckUnavailable
from ratelimit.keys import reservation_key
from ratelimit.redis_cluster import shared_commands
from tests.integration.ratelimit.conftest import GENEROUS_TIMEOUT_SECONDS
from tests.support.redis_servers import RedisServer

# Workspaces whose keys land on different nodes of a 3-master cluster, and two ids reported
# twice in the same message: the second report of each is a replay.
REPORTS = [(f"ws_{n}", f"r{n % 5}") for n in range(8)] + [("ws_0", "r0"), ("ws_6", "r1")]
FIRSTS = [True] * 8 + [False, False]


async def test_a_message_is_checked_in_one_call_and_repeats_are_replays(
    own_client: Redis,
) -> None:
    guard = RedisReplayGuard(own_client, timeout_s=GENEROUS_TIMEOUT_SECONDS)
    assert await guard.first_reports(REPORTS, ttl_s=60) == FIRSTS
    assert await guard.first_reports(REPORTS[:2], ttl_s=60) == [False, False]
    assert 0 < await own_client.ttl(reservation_key("ws_0", "r0")) <= 60
    assert await guard.first_reports([], ttl_s=60) == []


async def test_on_a_cluster_every_node_answers_its_part(cluster_client: RedisCluster) -> None:
    guard = RedisReplayGuard(shared_commands(cluster_client), timeout_s=GENEROUS_TIMEOUT_SECONDS)
    reports = [(f"{ws}-cluster", rid) for ws, rid in REPORTS]
    firsts = await guard.first_reports(reports, ttl_s=60)
    # The SETs run concurrently: of an id sent twice, exactly one report is the first.
    assert firsts[1:6] + firsts[7:8] == [True] * 6
    assert (firsts[0] + firsts[8], firsts[6] + firsts[9]) == (1, 1)
    assert await guard.first_reports(reports[:3], ttl_s=60) == [False] * 3


async def test_redis_down_says_so_for_the_whole_message(
    own_redis: RedisServer, own_client: Redis
) -> None:
    guard = RedisReplayGuard(own_client, timeout_s=GENEROUS_TIMEOUT_SECONDS)
    own_redis.kill()
    with pytest.raises(ReplayCheckUnavailable):
        await guard.first_reports(REPORTS, ttl_s=60)
