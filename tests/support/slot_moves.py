"""Redis Cluster slots moved by hand in tests, as an operator (or `redis-cli --cluster reshard`)
does: SETSLOT IMPORTING on the target, MIGRATING on the source, MIGRATE of the slot's keys a few
at a time, then SETSLOT NODE everywhere. Blocking calls: run them in a thread beside the load."""

from __future__ import annotations

import itertools
import time

import redis
from redis.crc import key_slot

from ratelimit.keys import workspace_hash_tag
from tests.support.redis_servers import RedisClusterServers, RedisServer


def slot_of(workspace: str) -> int:
    return key_slot(workspace_hash_tag(workspace).encode())


def workspaces_in_slot(slot: int, count: int, prefix: str) -> list[str]:
    """`count` workspace ids whose keys all live in `slot`."""
    found = (f"{prefix}-{i}" for i in itertools.count())
    return list(itertools.islice((w for w in found if slot_of(w) == slot), count))


def owner_index(cluster: RedisClusterServers, slot: int) -> int:
    return next(i for i in range(len(cluster.nodes)) if slot in cluster.slot_range(i))


def sync_client(node: RedisServer) -> redis.Redis:
    return redis.Redis(host=node.host, port=node.port, decode_responses=True)


class SlotMove:
    """A slot moved by hand between two masters, step by step (blocking calls: run in a thread)."""

    def __init__(self, cluster: RedisClusterServers, slot: int, source: int, target: int) -> None:
        self.slot = slot
        self.source, self.target = cluster.nodes[source], cluster.nodes[target]
        self.masters = cluster.nodes
        self.steps = 0

    def open(self) -> None:
        source, target = sync_client(self.source), sync_client(self.target)
        target.cluster("SETSLOT", self.slot, "IMPORTING", source.cluster("MYID"))
        source.cluster("SETSLOT", self.slot, "MIGRATING", target.cluster("MYID"))

    def move_keys(self, *, batch: int, pause_seconds: float) -> None:
        """MIGRATE the slot's keys `batch` at a time, pausing between steps."""
        source = sync_client(self.source)
        while keys := source.cluster("GETKEYSINSLOT", self.slot, batch):
            source.migrate(self.target.host, self.target.port, keys, 0, 5000)
            self.steps += 1
            time.sleep(pause_seconds)

    def close(self) -> None:
        """Give the slot to the target: on the target first, then everywhere, as Redis advises."""
        target_id = sync_client(self.target).cluster("MYID")
        for node in sorted(self.masters, key=lambda n: n is not self.target):
            sync_client(node).cluster("SETSLOT", self.slot, "NODE", target_id)

    def target_stat(self, command: str) -> int:
        """How many `command` calls the target has served."""
        stats = sync_client(self.target).info("commandstats")
        entry = stats.get(f"cmdstat_{command}")
        return int(entry["calls"]) if entry else 0

    def source_rejected_evalsha(self) -> int:
        """EVALSHA calls the source refused before running them (ASK, TRYAGAIN)."""
        entry = sync_client(self.source).info("commandstats").get("cmdstat_evalsha")
        return int(entry["rejected_calls"]) if entry else 0
