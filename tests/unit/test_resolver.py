"""The key cache: TTLs with an injected clock, invalidation, coalescing, and the revoke race."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from authz.cache import TtlCache
from authz.keys import generate_key, hash_key
from authz.metrics import Metrics
from authz.resolver import KeyResolver
from authz.store.base import Change, ChangeKind
from tests.support.clock import FakeClock
from tests.support.fakes import FakeStore, workspace


def resolver(store: FakeStore, clock: FakeClock[float]) -> KeyResolver:
    return KeyResolver(
        store,
        Metrics(CollectorRegistry()),
        size=3,
        ttl=60,
        negative_size=2,
        negative_ttl=10,
        stale_if_error=300,
        clock=clock,
    )


def test_ttl_cache_expiry_staleness_and_lru() -> None:
    clock = FakeClock(0.0)
    cache: TtlCache[str, int] = TtlCache(max_size=2, ttl=10, clock=clock, max_stale=5)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == (1, True)
    cache.put("c", 3)  # "b" was least recently used
    assert cache.get("b") is None
    clock.now = 12
    assert cache.get("a") == (1, False)
    clock.now = 16
    assert cache.get("a") is None


async def test_hits_misses_and_ttl_refresh() -> None:
    store, clock = FakeStore(), FakeClock(0.0)
    keys = resolver(store, clock)
    key = generate_key()
    store.add(key, workspace())
    for _ in range(3):
        assert await keys.resolve(hash_key(key)) is not None
    assert store.lookups == 1
    clock.now = 61
    await keys.resolve(hash_key(key))
    assert store.lookups == 2


async def test_unknown_keys_are_remembered_briefly() -> None:
    store, clock = FakeStore(), FakeClock(0.0)
    keys = resolver(store, clock)
    unknown = hash_key(generate_key())
    assert await keys.resolve(unknown) is None
    assert await keys.resolve(unknown) is None
    assert store.lookups == 1
    clock.now = 11
    await keys.resolve(unknown)
    assert store.lookups == 2


async def test_invalidation_by_key_and_workspace_and_reset() -> None:
    store, clock = FakeStore(), FakeClock(0.0)
    keys = resolver(store, clock)
    key = generate_key()
    store.add(key, workspace(rpm=5))
    await keys.resolve(hash_key(key))
    store.workspaces["ws_test"] = workspace(rpm=9)
    keys.on_change(Change(ChangeKind.WORKSPACE, "ws_test"))
    resolved = await keys.resolve(hash_key(key))
    assert resolved is not None
    assert resolved[1].rpm == 9
    del store.grants[hash_key(key)]
    keys.on_change(Change(ChangeKind.KEY, hash_key(key).hex()))
    assert await keys.resolve(hash_key(key)) is None
    lookups = store.lookups
    keys.on_reset()
    await keys.resolve(hash_key(key))
    assert store.lookups == lookups + 1


async def test_concurrent_misses_share_one_query() -> None:
    store, clock = FakeStore(), FakeClock(0.0)
    keys = resolver(store, clock)
    key = generate_key()
    store.add(key, workspace())
    store.gate = asyncio.Event()
    waiting = [asyncio.create_task(keys.resolve(hash_key(key))) for _ in range(20)]
    await asyncio.sleep(0)
    store.gate.set()
    results = await asyncio.gather(*waiting)
    assert all(r is not None for r in results)
    assert store.lookups == 1


async def test_a_lookup_racing_a_revocation_is_not_cached() -> None:
    store, clock = FakeStore(), FakeClock(0.0)
    keys = resolver(store, clock)
    key = generate_key()
    store.add(key, workspace())
    store.gate = asyncio.Event()
    slow = asyncio.create_task(keys.resolve(hash_key(key)))
    await asyncio.sleep(0)
    # The revocation lands while the (now stale) read is in flight.
    keys.on_change(Change(ChangeKind.KEY, hash_key(key).hex()))
    store.gate.set()
    assert await slow is not None
    del store.grants[hash_key(key)]
    store.gate = None
    assert await keys.resolve(hash_key(key)) is None
