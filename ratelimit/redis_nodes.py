"""Which Redis node a call goes to, and one circuit breaker per node.

On a standalone Redis there is one node and one breaker. On Redis Cluster each workspace's keys
live in one slot, owned by one master: a call is charged to the breaker of the master that owns
its slot in redis-py's current slot map, so a dead master opens only the circuit of the
workspaces it serves. When its replica is promoted, redis-py's refreshed map sends those slots
to the new master, whose breaker is closed.
"""

from __future__ import annotations

from redis.asyncio.cluster import RedisCluster

from ratelimit.breaker import BreakerState, CircuitBreaker

STANDALONE = "redis"
"""The node name of a standalone Redis."""

UNMAPPED = "cluster"
"""The node name for a slot redis-py has no owner for yet (before its first topology read)."""


class NodeBreakers:
    """One breaker per node, each a fresh copy of `prototype`'s settings."""

    def __init__(self, client: object, prototype: CircuitBreaker) -> None:
        self._cluster = client if isinstance(client, RedisCluster) else None
        self._prototype = prototype
        self._breakers: dict[str, CircuitBreaker] = {}

    @property
    def is_cluster(self) -> bool:
        return self._cluster is not None

    def node_for(self, key: str) -> str:
        """The node that owns `key` now ("host:port"; STANDALONE without a cluster)."""
        if self._cluster is None:
            return STANDALONE
        slot = self._cluster.keyslot(key)
        owners = self._cluster.nodes_manager.slots_cache.get(slot)
        return owners[0].name if owners else UNMAPPED

    def breaker(self, node: str) -> CircuitBreaker:
        """`node`'s breaker (on a standalone Redis: the prototype itself)."""
        if self._cluster is None:
            return self._prototype
        found = self._breakers.get(node)
        if found is None:
            found = self._breakers[node] = self._prototype.copy()
        return found

    def worst_state(self) -> BreakerState:
        """The most open state of any node's breaker (the exported gauge)."""
        states = [b.state for b in self._breakers.values()] or [self._prototype.state]
        return max(states, key=lambda state: state.value)

    def describe(self, node: str) -> str:
        """`node` with the slot ranges it owns, for log lines."""
        if self._cluster is None:
            return node
        slots = sorted(
            slot
            for slot, owners in self._cluster.nodes_manager.slots_cache.items()
            if owners and owners[0].name == node
        )
        return f"{node} (slots {_ranges(slots) or 'none'})"


def _ranges(slots: list[int]) -> str:
    """[0, 1, 2, 7] -> "0-2,7"."""
    parts: list[str] = []
    start = previous = None
    for slot in [*slots, None]:
        if slot is not None and previous is not None and slot == previous + 1:
            previous = slot
            continue
        if start is not None:
            parts.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = slot
    return ",".join(parts)
