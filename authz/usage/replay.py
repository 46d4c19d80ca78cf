"""Each signed reservation is reported once: the first report of an id wins, later ones are replays.

Two implementations behind one Protocol: Redis (`SET NX EX`, shared by every replica, the key in
the workspace's hash slot) and in-process for the embedded default (one process, one memory).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from ratelimit.keys import reservation_key
from ratelimit.redis_cluster import ClusterCommands


class ReplayCheckUnavailable(Exception):
    """The shared memory of reported ids did not answer in time."""


class ReplayGuard(Protocol):
    async def first_report(self, workspace_id: str, reservation_id: str, *, ttl_s: int) -> bool:
        """True the first time an id is reported within `ttl_s`, False for any repeat.
        Raises ReplayCheckUnavailable when that cannot be told."""
        ...


class MemoryReplayGuard:
    """Ids seen in this process, forgotten after their TTL (oldest first: the TTL is constant)."""

    def __init__(self, *, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()

    async def first_report(self, workspace_id: str, reservation_id: str, *, ttl_s: int) -> bool:
        now = self._clock()
        while self._seen:
            oldest, expires = next(iter(self._seen.items()))
            if expires > now:
                break
            del self._seen[oldest]
        if reservation_id in self._seen:
            return False
        self._seen[reservation_id] = now + ttl_s
        return True


REPLAY_TIMEOUT_S = 0.2
"""The replay check's budget: the access-log path is not a Check, so it gets more than a
Check's Redis call, still below Envoy's ext_authz timeout."""


class RedisReplayGuard:
    """`SET NX EX` on a key in the workspace's slot: one round trip, atomic across replicas."""

    def __init__(
        self, client: Redis | ClusterCommands, *, timeout_s: float = REPLAY_TIMEOUT_S
    ) -> None:
        """`client`: `ratelimit.redis_cluster.shared_commands` of the limiter's client."""
        self._client = client
        self._timeout_s = timeout_s
        self._late: set[asyncio.Task[Any]] = set()

    async def first_report(self, workspace_id: str, reservation_id: str, *, ttl_s: int) -> bool:
        key = reservation_key(workspace_id, reservation_id)
        task = asyncio.ensure_future(self._client.set(key, b"1", nx=True, ex=ttl_s))
        try:
            # Shielded: a late answer still completes (and marks the id) instead of leaving a
            # connection cut mid-reply; the socket timeouts bound it.
            created = await asyncio.wait_for(asyncio.shield(task), self._timeout_s)
        except (TimeoutError, RedisError, OSError) as error:
            if not task.done():
                self._late.add(task)
                task.add_done_callback(self._settled)
            raise ReplayCheckUnavailable(f"redis: {type(error).__name__}") from error
        return bool(created)

    def _settled(self, task: asyncio.Task[Any]) -> None:
        self._late.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a late failure has nothing left to tell
