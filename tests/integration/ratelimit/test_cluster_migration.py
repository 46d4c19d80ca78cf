"""Redis Cluster (3 masters + 3 replicas) while a slot migrates: the workspace is served throughout.

A slot is moved by hand as an operator (or `redis-cli --cluster reshard`) does: SETSLOT
IMPORTING on the target, MIGRATING on the source, MIGRATE of the slot's keys a few at a time,
then SETSLOT NODE. Meanwhile a busy, rate-limited workspace in that slot keeps calling, with the
production Redis timeout. Every answer is compared with the in-process twin on the same clock,
so one lost or doubled debit (a bucket read as full on the wrong node, a script run twice)
shows.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

import pytest
from redis.asyncio.cluster import RedisCluster

from ratelimit.keys import bucket_keys, reservation_key, workspace_hash_tag
from ratelimit.limiter import (
    LimitResult,
    Limits,
    Quota,
    QuotaState,
    RateLimiter,
    RateLimitUnavailable,
)
from ratelimit.memory import InMemoryRateLimiter
from ratelimit.redis_backend import connect_redis
from ratelimit.redis_cluster import ClusterCommands
from tests.integration.ratelimit.conftest import GENEROUS_TIMEOUT_SECONDS, FakeClockMs
from tests.support.clocked_redis import ClockedRedisRateLimiter
from tests.support.redis_servers import RedisClusterServers, redis_cluster
from tests.support.slot_moves import (
    SlotMove,
    owner_index,
    slot_of,
    sync_client,
    workspaces_in_slot,
)

pytestmark = pytest.mark.integration

PRODUCTION_TIMEOUT_SECONDS = 0.05
PERIOD = "2026-11"
LIMITS = Limits(rpm=60, tpm=6_000)
QUOTA = Quota(period=PERIOD, token_quota=10**9, spend_cap_micros=10**12)
"""Never binding, but every Check reads the usage counters: the script names all four keys."""


@pytest.fixture(scope="module")
def cluster3() -> Iterator[RedisClusterServers]:
    """A 3+3 cluster of this module's own: its tests move slots between masters."""
    with redis_cluster(3, replicas=True) as servers:
        yield servers


@pytest.fixture
async def cluster_client(cluster3: RedisClusterServers) -> AsyncIterator[RedisCluster]:
    client = connect_redis(cluster3.url, timeout_seconds=PRODUCTION_TIMEOUT_SECONDS)
    assert isinstance(client, RedisCluster)
    yield client
    await client.aclose()


@pytest.fixture
async def limiter(
    cluster3: RedisClusterServers, clock_ms: FakeClockMs
) -> AsyncIterator[ClockedRedisRateLimiter]:
    client = connect_redis(cluster3.url, timeout_seconds=PRODUCTION_TIMEOUT_SECONDS)
    limiter = ClockedRedisRateLimiter(
        client, timeout_seconds=PRODUCTION_TIMEOUT_SECONDS, clock_ms=clock_ms
    )
    yield limiter
    await limiter.close()


@dataclass
class Tally:
    """Per-round answers of Redis and of the twin, and Redis' failures."""

    redis: list[object] = field(default_factory=list)
    twin: list[object] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


async def checks(limiter: RateLimiter, workspace: str, count: int) -> list[tuple[bool, int, int]]:
    """`count` identical concurrent Checks at one instant: which passed, and what they were told
    (as a multiset: the order they reached Redis in does not matter)."""
    results: list[LimitResult] = await asyncio.gather(
        *(limiter.acquire(workspace, LIMITS, 7, quota=QUOTA) for _ in range(count))
    )
    return sorted((r.allowed, r.requests.remaining, r.tokens.remaining) for r in results)


async def report(
    limiter: RateLimiter, workspace: str, operation_id: str, *, refund: int = 3
) -> QuotaState:
    """One usage report (as the access-log path sends it): counters and a token refund."""
    return await limiter.record_usage(
        workspace,
        LIMITS,
        period=PERIOD,
        tpm_delta=-refund,
        tokens=4,
        spend_micros=9,
        operation_id=operation_id,
    )


async def one_round(
    limiters: Sequence[RateLimiter], workspace: str, count: int, tally: Tally
) -> None:
    """`count` concurrent Checks, then one usage report, on Redis and on the twin."""
    for limiter, answers in zip(limiters, (tally.redis, tally.twin), strict=True):
        try:
            answers.append(await checks(limiter, workspace, count))
            answers.append(await report(limiter, workspace, uuid.uuid4().hex))
        except RateLimitUnavailable as error:
            tally.failures.append(str(error))


@pytest.mark.parametrize("its_keys_move", ["first", "last"])
async def test_a_slow_slot_migration_fails_nothing_and_keeps_the_limit_exact(
    cluster3: RedisClusterServers,
    limiter: ClockedRedisRateLimiter,
    clock_ms: FakeClockMs,
    its_keys_move: str,
) -> None:
    """A slot of 300 keys moves 4 keys a step with a 10 ms pause. GETKEYSINSLOT lists the newest
    keys first: the workspace's keys move first when they are the newest, else last."""
    twin = InMemoryRateLimiter(clock_ms=clock_ms)
    both: tuple[RateLimiter, RateLimiter] = (limiter, twin)
    workspace = f"busy-{uuid.uuid4().hex[:8]}"
    slot = slot_of(workspace)
    source = owner_index(cluster3, slot)
    move = SlotMove(cluster3, slot, source, (source + 1) % 3)

    def add_other_keys() -> None:
        """Other workspaces' keys in the slot (as in production): the slot moves slowly."""
        other = sync_client(cluster3.nodes[source])
        for i in range(300):
            other.set(f"other:{workspace_hash_tag(workspace)}:{i}", "x")

    if its_keys_move == "first":
        add_other_keys()
    tally = Tally()
    for limiter_ in both:
        await limiter_.seed_usage(workspace, period=PERIOD, tokens=0, spend_micros=0)
    await one_round(both, workspace, 20, tally)  # busy already: its keys exist
    if its_keys_move == "last":
        add_other_keys()

    async def next_round() -> None:
        clock_ms.advance(250)  # the scripts and the twin share this clock
        await one_round(both, workspace, 8, tally)

    asking_before = move.target_stat("asking")
    move.open()
    moving = asyncio.create_task(asyncio.to_thread(move.move_keys, batch=4, pause_seconds=0.01))
    rounds = 0
    while not moving.done():
        await next_round()
        rounds += 1
    await moving
    for _ in range(3):  # the slot is empty on the source: every call is ASKed to the target
        await next_round()
    asked = move.target_stat("asking") - asking_before
    await asyncio.to_thread(move.close)
    for _ in range(3):  # settled: MOVED, then the target serves the slot
        await next_round()

    assert move.steps >= 70  # a slow migration,
    assert rounds >= 20  # with the load running throughout,
    assert asked >= 3 * 9  # and the target serving while it imported
    assert tally.failures == []  # no Check and no usage report failed
    assert tally.redis == tally.twin  # and each was answered exactly, on whichever node
    passed = [c[0] for answer in tally.redis if isinstance(answer, list) for c in answer]
    assert 0 < passed.count(True) < len(passed) / 2  # the workspace was rate-limited throughout


async def test_the_ask_window_under_concurrency_fails_nothing(
    cluster3: RedisClusterServers,
    limiter: ClockedRedisRateLimiter,
    cluster_client: RedisCluster,
    clock_ms: FakeClockMs,
) -> None:
    """All of a slot's keys already moved, the slot not yet given: every call is ASKed.
    redis-py sends ASKING and the command on two pooled connections (docs/redis-cluster.md);
    under concurrency the command then arrives without it and is MOVED back."""
    twin = InMemoryRateLimiter(clock_ms=clock_ms)
    tag = uuid.uuid4().hex[:8]
    slot = slot_of(f"ask-{tag}")
    workspaces = workspaces_in_slot(slot, 4, f"ask-{tag}")
    source = owner_index(cluster3, slot)
    move = SlotMove(cluster3, slot, source, (source + 2) % 3)
    tallies = {workspace: Tally() for workspace in workspaces}
    for workspace, tally in tallies.items():
        for limiter_ in (limiter, twin):
            await limiter_.seed_usage(workspace, period=PERIOD, tokens=0, spend_micros=0)
        await one_round((limiter, twin), workspace, 4, tally)

    move.open()
    await asyncio.to_thread(move.move_keys, batch=100, pause_seconds=0)
    asking_before = move.target_stat("asking")
    for _ in range(5):
        clock_ms.advance(500)
        await asyncio.gather(*(one_round((limiter, twin), w, 25, t) for w, t in tallies.items()))
    # The access-log replay check's SET NX, on the same client, through the same window.
    marks = [reservation_key(w, f"rsv-{i}") for w in workspaces for i in range(5)]
    commands = ClusterCommands(cluster_client)
    for first in (True, False):  # set once, then refused: NX holds on the importing node
        done = await asyncio.gather(*(commands.set(m, b"1", nx=True, ex=60) for m in marks))
        assert done == [first] * len(marks)
    asked = move.target_stat("asking") - asking_before
    await asyncio.to_thread(move.close)

    for tally in tallies.values():
        assert tally.failures == []
        assert tally.redis == tally.twin
    assert asked >= 5 * 4 * 26  # every Check and report went through ASK


async def test_a_call_waits_while_its_keys_are_split_between_the_nodes(
    cluster3: RedisClusterServers, clock_ms: FakeClockMs
) -> None:
    """The migration moved one of the workspace's keys, not yet the others: the source answers
    TRYAGAIN until the next step moves them, and the call waits for that, within its budget."""
    client = connect_redis(cluster3.url, timeout_seconds=GENEROUS_TIMEOUT_SECONDS)
    limiter = ClockedRedisRateLimiter(
        client, timeout_seconds=GENEROUS_TIMEOUT_SECONDS, clock_ms=clock_ms
    )
    twin = InMemoryRateLimiter(clock_ms=clock_ms)
    workspace = f"split-{uuid.uuid4().hex[:8]}"
    slot = slot_of(workspace)
    source = owner_index(cluster3, slot)
    move = SlotMove(cluster3, slot, source, (source + 1) % 3)
    tally = Tally()
    try:
        for limiter_ in (limiter, twin):
            await limiter_.seed_usage(workspace, period=PERIOD, tokens=0, spend_micros=0)
        await one_round((limiter, twin), workspace, 3, tally)
        move.open()
        requests_key = bucket_keys(workspace)[0]
        moved = sync_client(move.source).migrate(
            move.target.host, move.target.port, [requests_key], 0, 5000
        )
        assert moved == "OK"  # the request bucket existed (else NOKEY), and moved alone
        refused = move.source_rejected_evalsha()
        waiting = asyncio.create_task(checks(limiter, workspace, 1))
        while move.source_rejected_evalsha() < refused + 2:  # it met TRYAGAIN, and tries again
            await asyncio.sleep(0.001)
        assert not waiting.done()
        await asyncio.to_thread(move.move_keys, batch=100, pause_seconds=0)
        assert await waiting == await checks(twin, workspace, 1)
        await asyncio.to_thread(move.close)
        await one_round((limiter, twin), workspace, 3, tally)
    finally:
        await limiter.close()
    assert tally.failures == []
    assert tally.redis == tally.twin
