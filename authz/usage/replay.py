"""Each signed reservation is reported once: the first report of an id wins, later ones are replays.

Two implementations behind one Protocol: Redis (`SET NX EX`, shared by every replica, the key in
the workspace's hash slot) and in-process for the embedded default (one process, one memory).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from ratelimit.keys import reservation_key
from ratelimit.redis_cluster import ClusterCommands


class ReplayCheckUnavailable(Exception):
    """The shared memory of reported ids did not answer in time."""


Report = tuple[str, str]
"""(workspace id, reservation id)."""


class ReplayGuard(Protocol):
    async def first_reports(self, reports: Sequence[Report], *, ttl_s: int) -> list[bool]:
        """For each report in order, True the first time its id is reported within `ttl_s`,
        False for any repeat (an id twice in `reports` too). Raises ReplayCheckUnavailable
        when that cannot be told."""
        ...


class MemoryReplayGuard:
    """Ids seen in this process, forgotten after their TTL (oldest first: the TTL is constant)."""

    def __init__(self, *, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()

    async def first_reports(self, reports: Sequence[Report], *, ttl_s: int) -> list[bool]:
        now = self._clock()
        while self._seen:
            oldest, expires = next(iter(self._seen.items()))
            if expires > now:
                break
            del self._seen[oldest]
        return [self._first(reservation_id, now + ttl_s) for _, reservation_id in reports]

    async def first_report(self, workspace_id: str, reservation_id: str, *, ttl_s: int) -> bool:
        """`first_reports` of one."""
        return (await self.first_reports([(workspace_id, reservation_id)], ttl_s=ttl_s))[0]

    def _first(self, reservation_id: str, expires: float) -> bool:
        if reservation_id in self._seen:
            return False
        self._seen[reservation_id] = expires
        return True


REPLAY_TIMEOUT_S = 0.2
"""The replay check's budget: the access-log path is not a Check, so it gets more than a
Check's Redis call, still below Envoy's ext_authz timeout."""


class RedisReplayGuard:
    """`SET NX EX` on a key in the workspace's slot, atomic across replicas: a whole message's
    entries in one pipelined round trip (on a cluster, concurrent routed calls)."""

    def __init__(
        self, client: Redis | ClusterCommands, *, timeout_s: float = REPLAY_TIMEOUT_S
    ) -> None:
        """`client`: `ratelimit.redis_cluster.shared_commands` of the limiter's client."""
        self._client = client
        self._timeout_s = timeout_s
        self._late: set[asyncio.Task[Any]] = set()

    async def first_reports(self, reports: Sequence[Report], *, ttl_s: int) -> list[bool]:
        if not reports:
            return []
        keys = [reservation_key(workspace_id, rid) for workspace_id, rid in reports]
        task = asyncio.ensure_future(self._set_all(keys, ttl_s))
        try:
            # Shielded: a late answer still completes (and marks the id) instead of leaving a
            # connection cut mid-reply; the socket timeouts bound it.
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can lose a cancellation.
            async with asyncio.timeout(self._timeout_s):
                created = await asyncio.shield(task)
        except (TimeoutError, RedisError, OSError) as error:
            if not task.done():
                self._late.add(task)
                task.add_done_callback(self._settled)
            raise ReplayCheckUnavailable(f"redis: {type(error).__name__}") from error
        return [bool(answer) for answer in created]

    async def _set_all(self, keys: list[str], ttl_s: int) -> list[Any]:
        client = self._client
        if isinstance(client, Redis):
            pipeline = client.pipeline(transaction=False)
            for key in keys:
                pipeline.set(key, b"1", nx=True, ex=ttl_s)
            return list(await pipeline.execute())
        # A cluster: each key to its owner, routed to survive a slot migration, all at once
        # (an id twice in one message: exactly one of its SETs wins).
        return list(
            await asyncio.gather(*(client.set(key, b"1", nx=True, ex=ttl_s) for key in keys))
        )

    def _settled(self, task: asyncio.Task[Any]) -> None:
        self._late.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a late failure has nothing left to tell
