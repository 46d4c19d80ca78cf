"""The Lua script on real Redis and the Python maths must agree exactly, operation by operation.

Random workloads run through `InMemoryRateLimiter` and `RedisRateLimiter` on one fake clock (the
script's test-only "now" override): acquires with and without a quota (random token quotas and
spend caps, None included, near and far from the boundary), TPM refunds and charges (debts far
past one bucket, up to the exactness bounds, included),
`record_usage` (bucket delta plus counter increments, saturation included) and `seed_usage`, on
two periods, with clock steps and limits from tiny to MAX_LIMIT. Every LimitResult and every
QuotaState must be identical, and the raw state Redis stores (both buckets and all four usage
counters) must equal the state the pure `ratelimit.bucket` / `ratelimit.quota` functions compute.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ratelimit import bucket, quota
from ratelimit.keys import bucket_keys, usage_keys
from ratelimit.limiter import Limits, Quota
from ratelimit.memory import InMemoryRateLimiter
from ratelimit.redis_backend import RedisClient, RedisRateLimiter, connect_redis
from tests.integration.ratelimit.conftest import GENEROUS_TIMEOUT_SECONDS, FakeClockMs
from tests.support.clocked_redis import ClockedRedisRateLimiter

pytestmark = pytest.mark.integration

PERIODS = ("2025-01", "2025-02")


@dataclass(frozen=True)
class Op:
    kind: str  # "acquire", "adjust", "record" or "seed"
    amount: int  # acquire: token cost; adjust, record: TPM delta; seed: tokens
    step_ms: int
    quota: Quota | None = None  # acquire with a quota
    spend: int = 0  # acquire, record, seed: micro-USD
    tokens: int = 0  # record: tokens to count
    period: str = PERIODS[0]  # record, seed


@dataclass(frozen=True)
class Scenario:
    limits: Limits
    ops: list[Op]


def limit_values() -> st.SearchStrategy[int]:
    return st.one_of(
        st.just(0),
        st.integers(1, 20),
        st.integers(21, 100_000),
        st.integers(bucket.MAX_LIMIT // 1000, bucket.MAX_LIMIT),
    )


def usage_amounts(scale: int) -> st.SearchStrategy[int]:
    """Mostly near `scale`, so counters cross quotas; sometimes past MAX_COUNTER (saturation)."""
    return st.one_of(
        st.integers(0, scale),
        st.integers(0, scale),
        st.integers(0, 4 * scale),
        st.integers(quota.MAX_COUNTER - 10, 2 * quota.MAX_COUNTER),
    )


def quota_limits(scale: int) -> st.SearchStrategy[int | None]:
    return st.one_of(
        st.none(),
        st.just(0),
        st.integers(0, 8 * scale),
        st.integers(quota.MAX_COUNTER - 10, 10**20),
    )


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    limits = Limits(rpm=draw(limit_values()), tpm=draw(limit_values()))
    tpm = max(limits.tpm, 10)
    scale = min(tpm, 10**6)
    step = st.one_of(st.just(0), st.integers(0, 50), st.integers(0, 5_000), st.integers(0, 130_000))
    cost = st.one_of(st.integers(0, tpm // 3), st.integers(0, tpm + tpm // 4))
    period = st.sampled_from(PERIODS)
    quotas = st.builds(
        Quota, period=period, token_quota=quota_limits(scale), spend_cap_micros=quota_limits(scale)
    )
    acquire = st.builds(Op, kind=st.just("acquire"), amount=cost, step_ms=step)
    acquire_quota = st.builds(
        Op,
        kind=st.just("acquire"),
        amount=cost,
        step_ms=step,
        quota=quotas,
        spend=st.one_of(st.integers(0, scale), usage_amounts(scale)),
    )
    # Overuse far past a bucket is debt, carried whole (issue 17, finding 6); the largest
    # charges reach MAX_CHARGE and, a dozen in a row, the MAX_DEBT floor.
    delta = st.one_of(
        st.integers(-2 * tpm, 2 * tpm),
        st.integers(-3 * tpm, 1000 * tpm),
        st.integers(bucket.MAX_CHARGE - 10, 3 * bucket.MAX_CHARGE),
    )
    adjust = st.builds(Op, kind=st.just("adjust"), amount=delta, step_ms=step)
    record = st.builds(
        Op,
        kind=st.just("record"),
        amount=delta,
        step_ms=step,
        spend=usage_amounts(scale),
        tokens=usage_amounts(scale),
        period=period,
    )
    seed = st.builds(
        Op,
        kind=st.just("seed"),
        amount=usage_amounts(scale),
        step_ms=step,
        spend=usage_amounts(scale),
        period=period,
    )
    any_op = st.one_of(acquire, acquire_quota, acquire_quota, adjust, record, record, seed)
    return Scenario(limits=limits, ops=draw(st.lists(any_op, min_size=8, max_size=40)))


async def stored_level(client: RedisClient, key: str) -> bucket.BucketLevel | None:
    level, updated = await client.hmget(key, ["l", "t"])
    if level is None or updated is None:
        return None
    return bucket.BucketLevel(level=int(level), updated_ms=int(updated))


async def stored_counters(client: RedisClient, workspace: str, period: str) -> quota.Counters:
    tokens, spend = await client.mget(list(usage_keys(workspace, period)))
    return quota.Counters(
        tokens=None if tokens is None else int(tokens),
        spend_micros=None if spend is None else int(spend),
    )


class Reference:
    """The pure functions, driven directly, to predict the raw state Redis must hold."""

    def __init__(self, limits: Limits) -> None:
        self.limits = bucket.normalise_limits(limits)
        self.requests: bucket.BucketLevel | None = None
        self.tokens: bucket.BucketLevel | None = None
        self.counters = {period: quota.Counters() for period in PERIODS}

    def run(self, op: Op, now_ms: int) -> None:
        if op.kind == "acquire":
            self.acquire(op, now_ms)
            return
        if op.kind in ("adjust", "record") and op.amount:
            delta = bucket.normalise_delta(op.amount, self.limits.tpm)
            self.tokens = (
                bucket.adjust(self.limits.tpm, delta, now_ms=now_ms, tokens=self.tokens)
                or self.tokens
            )
        spend = quota.normalise_amount(op.spend, "spend")
        counters = self.counters[op.period]
        if op.kind == "record":
            tokens = quota.normalise_amount(op.tokens, "tokens")
            self.counters[op.period] = quota.record(counters, tokens, spend)
        elif op.kind == "seed":
            tokens = quota.normalise_amount(op.amount, "tokens")
            self.counters[op.period] = quota.seed(counters, tokens, spend)

    def acquire(self, op: Op, now_ms: int) -> None:
        cost = bucket.normalise_cost(op.amount)
        if op.quota is None:
            outcome = bucket.acquire(
                self.limits, cost, now_ms=now_ms, requests=self.requests, tokens=self.tokens
            )
        else:
            normalised = quota.normalise_quota(op.quota)
            outcome = quota.acquire(
                self.limits,
                cost,
                now_ms=now_ms,
                requests=self.requests,
                tokens=self.tokens,
                quota=normalised,
                counters=self.counters[normalised.period],
                usage_tokens=quota.normalise_amount(op.amount, "tokens"),
                usage_spend=quota.normalise_amount(op.spend, "spend"),
            )
        self.requests = outcome.requests or self.requests
        self.tokens = outcome.tokens or self.tokens

    def matches(self, limit: int, expected: bucket.BucketLevel | None, stored: object) -> bool:
        if stored is not None:
            return stored == expected
        # Redis may already have expired a key whose bucket is full; absent means full.
        return expected is None or expected.level >= bucket.capacity(limit)


async def run_op(
    memory: InMemoryRateLimiter, redis: RedisRateLimiter, workspace: str, limits: Limits, op: Op
) -> None:
    """Run one op on both limiters and require identical answers."""
    if op.kind == "acquire":
        expected = await memory.acquire(
            workspace, limits, op.amount, quota=op.quota, spend_micros=op.spend
        )
        actual = await redis.acquire(
            workspace, limits, op.amount, quota=op.quota, spend_micros=op.spend
        )
        assert actual == expected
        missing = [r.quota.missing if r.quota else None for r in (actual, expected)]
        assert missing[0] == missing[1]
    elif op.kind == "adjust":
        await memory.adjust_tokens(workspace, limits, op.amount)
        await redis.adjust_tokens(workspace, limits, op.amount)
    elif op.kind == "record":
        states = [
            await limiter.record_usage(
                workspace,
                limits,
                period=op.period,
                tpm_delta=op.amount,
                tokens=op.tokens,
                spend_micros=op.spend,
            )
            for limiter in (memory, redis)
        ]
        assert states[1] == states[0]
        assert states[1].missing == states[0].missing
    else:
        for seeder in (memory, redis):
            await seeder.seed_usage(
                workspace, period=op.period, tokens=op.amount, spend_micros=op.spend
            )


async def run_scenario(client: RedisClient, scenario: Scenario) -> None:
    clock = FakeClockMs()
    memory = InMemoryRateLimiter(clock_ms=clock)
    redis = ClockedRedisRateLimiter(
        client, timeout_seconds=GENEROUS_TIMEOUT_SECONDS, clock_ms=clock
    )
    reference = Reference(scenario.limits)
    workspace = f"parity-{uuid.uuid4().hex}"
    requests_key, tokens_key = bucket_keys(workspace)
    for index, op in enumerate(scenario.ops):
        clock.advance(op.step_ms)
        try:
            await run_op(memory, redis, workspace, scenario.limits, op)
        except AssertionError as error:
            raise AssertionError(f"op {index}: {op}") from error
        reference.run(op, clock.now)
        limits = reference.limits
        assert reference.matches(
            limits.rpm, reference.requests, await stored_level(client, requests_key)
        ), f"request bucket after op {index}: {op}"
        assert reference.matches(
            limits.tpm, reference.tokens, await stored_level(client, tokens_key)
        ), f"token bucket after op {index}: {op}"
        for period in PERIODS:
            stored = await stored_counters(client, workspace, period)
            assert stored == reference.counters[period], f"{period} counters after op {index}"


def test_lua_and_python_agree_exactly(redis_url: str) -> None:
    # A sync test with its own event loop: hypothesis re-runs the inner function many times,
    # and one loop and one client serve all of them.
    with asyncio.Runner() as runner:
        client = connect_redis(redis_url, timeout_seconds=GENEROUS_TIMEOUT_SECONDS)
        try:

            @settings(
                max_examples=100,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            )
            @given(scenario=scenarios())
            def check(scenario: Scenario) -> None:
                runner.run(run_scenario(client, scenario))

            check()
        finally:
            runner.run(client.aclose())
