"""Key hash → (key, workspace) through the in-process cache; the store only on a miss.

The hot path is two dict lookups. Concurrent misses for one hash share one query. A change
feed (NOTIFY or the embedded poller) invalidates entries; a lookup that raced with an
invalidation is answered but not cached, so a revocation can never be undone by a slow read.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from dataclasses import replace

from prometheus_client import Counter

from authz.cache import TtlCache
from authz.metrics import Metrics
from authz.models import KeyGrant, Workspace
from authz.store.base import Change, ChangeKind, Store, StoreUnavailable
from authz.tracing import CheckTracing, traced_call

Resolved = tuple[KeyGrant, Workspace]


class KeyResolver:
    """Answers "which live key and workspace is this hash?" and keeps the caches coherent."""

    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        *,
        size: int,
        ttl: float,
        negative_size: int,
        negative_ttl: float,
        stale_if_error: float,
        clock: Callable[[], float] = time.monotonic,
        tracing: CheckTracing | None = None,
    ) -> None:
        self._store = store
        self._tracing = tracing
        self._metrics = metrics
        self._keys: TtlCache[bytes, KeyGrant] = TtlCache(
            max_size=size, ttl=ttl, clock=clock, max_stale=stale_if_error
        )
        self._workspaces: TtlCache[str, Workspace] = TtlCache(
            max_size=size, ttl=ttl, clock=clock, max_stale=stale_if_error
        )
        self._unknown: TtlCache[bytes, bool] = TtlCache(
            max_size=negative_size, ttl=negative_ttl, clock=clock
        )
        self._inflight: dict[bytes, asyncio.Future[Resolved | None]] = {}
        self._epoch = 0
        self._hit = metrics.cache.labels("hit")
        self._negative_hit = metrics.cache.labels("negative_hit")
        self._miss = metrics.cache.labels("miss")
        self._stale = metrics.cache.labels("stale")

    async def resolve(self, key_hash: bytes) -> Resolved | None:
        """The live key and its workspace, or None; raises StoreUnavailable when unsure."""
        cached = self._keys.get(key_hash)
        if cached is not None and cached[1]:
            workspace = self._workspaces.get(cached[0].workspace_id)
            if workspace is not None and workspace[1]:
                self._count(self._hit, "hit")
                return cached[0], workspace[0]
        elif cached is None:
            unknown = self._unknown.get(key_hash)
            if unknown is not None and unknown[1]:
                self._count(self._negative_hit, "negative_hit")
                return None
        self._count(self._miss, "miss")
        try:
            return await self._load_shared(key_hash)
        except StoreUnavailable:
            stale = self._stale_answer(key_hash)
            if stale is None:
                raise
            self._count(self._stale, "stale")
            return stale

    async def workspace(self, workspace_id: str) -> Workspace | None:
        """A workspace through the cache (used off the hot path, e.g. by reconciliation)."""
        cached = self._workspaces.get(workspace_id)
        if cached is not None and cached[1]:
            return cached[0]
        try:
            found = await self._store.get_workspace(workspace_id)
        except StoreUnavailable:
            if cached is not None:
                return cached[0]
            raise
        if found is not None:
            self._workspaces.put(workspace_id, found)
        return found

    def _stale_answer(self, key_hash: bytes) -> Resolved | None:
        cached = self._keys.get(key_hash)
        if cached is None:
            return None
        workspace = self._workspaces.get(cached[0].workspace_id)
        return None if workspace is None else (cached[0], workspace[0])

    async def _load_shared(self, key_hash: bytes) -> Resolved | None:
        pending = self._inflight.get(key_hash)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Resolved | None] = asyncio.get_running_loop().create_future()
        self._inflight[key_hash] = future
        try:
            result = await self._load(key_hash)
        except BaseException as error:
            future.set_exception(error)
            # Waiters re-raise it; mark it retrieved so a lone caller does not warn.
            future.exception()
            raise
        else:
            future.set_result(result)
            return result
        finally:
            del self._inflight[key_hash]

    async def _load(self, key_hash: bytes) -> Resolved | None:
        epoch = self._epoch
        started = time.perf_counter()
        try:
            with traced_call(self._tracing, "store lookup_key"):
                result = await self._store.lookup_key(key_hash)
        except StoreUnavailable:
            self._metrics.store_errors.labels("lookup_key").inc()
            raise
        finally:
            self._metrics.store_latency.observe(time.perf_counter() - started)
        if epoch == self._epoch:
            if result is None:
                self._keys.pop(key_hash)
                self._unknown.put(key_hash, True)
            else:
                self._unknown.pop(key_hash)
                result = _shared_ids(*result)
                self._keys.put(key_hash, result[0])
                self._workspaces.put(result[1].id, result[1])
        return result

    def _count(self, counter: Counter, result: str) -> None:
        """A cache lookup's result, on the metrics and, when tracing, on the Check's span."""
        counter.inc()
        if self._tracing is not None:
            self._tracing.cache(result)

    # ChangeSink

    def on_change(self, change: Change) -> None:
        self._epoch += 1
        self._metrics.invalidations.labels(change.kind.value).inc()
        if change.kind is ChangeKind.KEY:
            try:
                key_hash = bytes.fromhex(change.ref)
            except ValueError:
                return
            self._keys.pop(key_hash)
            self._unknown.pop(key_hash)
        else:
            self._workspaces.pop(change.ref)

    def on_reset(self) -> None:
        self._epoch += 1
        self._metrics.invalidations.labels("reset").inc()
        self._keys.clear()
        self._workspaces.clear()
        self._unknown.clear()


def _shared_ids(grant: KeyGrant, workspace: Workspace) -> Resolved:
    """The grant and workspace with one interned copy of the workspace id: every cached key
    of a workspace points at it, instead of each holding its own copy from the database row."""
    workspace_id = sys.intern(workspace.id)
    if workspace.id is not workspace_id:
        workspace = replace(workspace, id=workspace_id)
    if grant.workspace_id is not workspace_id:
        grant = replace(grant, workspace_id=workspace_id)
    return grant, workspace
