"""The ledger-mark scripts (record_month, fold, seed_begin, seed_finish) on real Redis against
their Python twin (ratelimit/marks.py) and the in-process limiter: random operation sequences
must give the same replies, and Redis must hold exactly the state the twin computes."""

from __future__ import annotations

import random

import pytest
from redis.asyncio.cluster import RedisCluster

from ratelimit.keys import month_keys
from ratelimit.limiter import Limits, UsageTag
from ratelimit.marks import Month, fold, position, record, seed_begin, seed_finish
from ratelimit.memory import InMemoryRateLimiter
from ratelimit.quota import Counters
from ratelimit.redis_backend import RedisClient, RedisRateLimiter, connect_redis
from tests.integration.ratelimit.conftest import GENEROUS_TIMEOUT_SECONDS
from tests.support.redis_servers import RedisClusterServers, send_command

pytestmark = pytest.mark.integration

PERIOD = "2026-11"
LIMITS = Limits(rpm=0, tpm=0)
HOLD_MS = 600_000


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def stored(client: RedisClient, workspace_id: str) -> Month:
    tokens_key, spend_key, ledger_key = month_keys(workspace_id, PERIOD)
    tokens, spend = await client.get(tokens_key), await client.get(spend_key)
    ledger = await client.hgetall(ledger_key)
    return Month(
        Counters(
            tokens=None if tokens is None else int(tokens),
            spend_micros=None if spend is None else int(spend),
        ),
        {text(k): text(v) for k, v in ledger.items()} or None,
    )


@pytest.mark.parametrize("seed", range(12))
async def test_scripts_match_the_python_twin(
    redis_client: RedisClient, workspace_id: str, seed: int
) -> None:
    await run_against_the_twin(redis_client, workspace_id, seed, steps=300)


async def test_scripts_match_the_python_twin_on_a_cluster(
    cluster: RedisClusterServers, workspace_id: str
) -> None:
    client = connect_redis(cluster.url, timeout_seconds=GENEROUS_TIMEOUT_SECONDS)
    assert isinstance(client, RedisCluster)
    try:
        workspaces = [f"{workspace_id}-{n}" for n in range(12)]  # over every master
        assert {len({client.keyslot(k) for k in month_keys(w, PERIOD)}) for w in workspaces} == {1}
        for seed, workspace in enumerate(workspaces):
            await run_against_the_twin(client, workspace, seed, steps=60)
        for node in cluster.nodes:
            assert int(send_command(node.port, "DBSIZE")[1:]) > 0
    finally:
        await client.aclose()


async def run_against_the_twin(
    client: RedisClient, workspace_id: str, seed: int, *, steps: int
) -> None:
    rng = random.Random(seed)
    on_redis = RedisRateLimiter(client, timeout_seconds=GENEROUS_TIMEOUT_SECONDS)
    partial_losses = seed % 2 == 1  # the in-process limiter only ever loses everything
    limiters: tuple[RedisRateLimiter | InMemoryRateLimiter, ...] = (on_redis,)
    if not partial_losses:
        limiters = (on_redis, InMemoryRateLimiter())
    model = Month(Counters(), None)
    for step in range(steps):
        replica = rng.choice(["a", "b"])
        choice = rng.random()
        amounts = (rng.randint(0, 40), rng.randint(0, 70))
        if choice < 0.35:
            generation = rng.randint(0, 6)
            model, recorded = record(model, replica, generation, *amounts)
            for limiter in limiters:
                state = await limiter.record_usage(
                    workspace_id,
                    LIMITS,
                    period=PERIOD,
                    tpm_delta=0,
                    tokens=amounts[0],
                    spend_micros=amounts[1],
                    operation_id=f"op{seed}-{step}",
                    tag=UsageTag(replica, generation),
                )
                assert state.known == (recorded.value != 0), step
                assert state.tokens_used == (model.counters.tokens or 0), step
        elif choice < 0.65:
            at = position(rng.randint(0, 6), rng.choice([None, 0, 1]))
            model, folded = fold(model, replica, at, *amounts)
            for folder in limiters:
                got = await folder.fold_ledger(
                    workspace_id,
                    period=PERIOD,
                    replica_id=replica,
                    position=at,
                    tokens=amounts[0],
                    spend_micros=amounts[1],
                )
                assert got is folded, step
        elif choice < 0.78:
            token = rng.choice(["x", "y"])
            model, start = seed_begin(model, token)
            for seeder in limiters:
                begun = await seeder.begin_seed(
                    workspace_id, period=PERIOD, token=token, hold_ms=HOLD_MS
                )
                assert begun is start, step
        elif choice < 0.93:
            token = rng.choice(["x", "y"])
            marks = {r: position(rng.randint(0, 6)) for r in rng.sample(["a", "b", "c"], 2)}
            model, done = seed_finish(model, token, *amounts, marks)
            for seeder in limiters:
                finished = await seeder.finish_seed(
                    workspace_id,
                    period=PERIOD,
                    token=token,
                    tokens=amounts[0],
                    spend_micros=amounts[1],
                    snapshot_marks=marks,
                )
                assert finished == done, step
        else:
            keys = month_keys(workspace_id, PERIOD)
            lost = rng.choice([keys[:1], keys[1:2], keys[2:], keys]) if partial_losses else keys
            await client.delete(*lost)
            model = Month(
                Counters(
                    tokens=None if keys[0] in lost else model.counters.tokens,
                    spend_micros=None if keys[1] in lost else model.counters.spend_micros,
                ),
                None if keys[2] in lost else model.ledger,
            )
            if not partial_losses:
                limiters = (on_redis, InMemoryRateLimiter())  # a new process
        assert await stored(client, workspace_id) == model, step
