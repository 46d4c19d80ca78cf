"""Per-node breakers on Redis Cluster: a call is charged to the master owning its slot."""

from __future__ import annotations

from redis.asyncio.cluster import ClusterNode, RedisCluster

from ratelimit.breaker import BreakerState, CircuitBreaker
from ratelimit.keys import bucket_keys
from ratelimit.redis_backend import connect_redis
from ratelimit.redis_nodes import STANDALONE, UNMAPPED, NodeBreakers


def cluster_with_two_masters() -> tuple[RedisCluster, ClusterNode, ClusterNode]:
    client = connect_redis("redis+cluster://127.0.0.1:7000", timeout_seconds=0.05)
    assert isinstance(client, RedisCluster)
    first, second = ClusterNode("127.0.0.1", 7000), ClusterNode("127.0.0.1", 7001)
    for slot in range(16384):
        client.nodes_manager.slots_cache[slot] = [first if slot < 8000 or slot == 9000 else second]
    return client, first, second


def test_standalone_has_one_breaker_the_one_given() -> None:
    prototype = CircuitBreaker()
    nodes = NodeBreakers(connect_redis("redis://127.0.0.1:1/0", timeout_seconds=0.05), prototype)
    assert nodes.node_for("anything") == STANDALONE
    assert nodes.breaker(STANDALONE) is prototype


def test_each_master_gets_its_own_breaker() -> None:
    client, first, second = cluster_with_two_masters()
    nodes = NodeBreakers(client, CircuitBreaker(failure_threshold=1))
    on_first = next(w for w in map(str, range(100)) if client.keyslot(bucket_keys(w)[0]) < 8000)
    on_second = next(w for w in map(str, range(100)) if client.keyslot(bucket_keys(w)[0]) > 9000)
    assert nodes.node_for(bucket_keys(on_first)[0]) == first.name
    assert nodes.node_for(bucket_keys(on_second)[0]) == second.name
    nodes.breaker(first.name).record_failure()
    assert nodes.breaker(first.name).state is BreakerState.OPEN
    assert nodes.breaker(second.name).state is BreakerState.CLOSED
    assert nodes.worst_state() is BreakerState.OPEN


def test_an_unmapped_slot_has_a_node_name_too() -> None:
    client = connect_redis("redis+cluster://127.0.0.1:7000", timeout_seconds=0.05)
    assert NodeBreakers(client, CircuitBreaker()).node_for("k") == UNMAPPED


def test_log_lines_name_the_slot_ranges() -> None:
    client, first, second = cluster_with_two_masters()
    nodes = NodeBreakers(client, CircuitBreaker())
    assert nodes.describe(first.name) == "127.0.0.1:7000 (slots 0-7999,9000)"
    assert nodes.describe(second.name) == "127.0.0.1:7001 (slots 8000-8999,9001-16383)"
