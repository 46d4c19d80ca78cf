"""The Lua script on real Redis and the Python maths must agree exactly, operation by operation.

Random workloads (costs, refunds, charges, clock steps, limits from tiny to MAX_LIMIT) run
through `InMemoryRateLimiter` and `RedisRateLimiter` on one fake clock (the script's test-only
"now" override). Every LimitResult must be identical, and the raw state Redis stores must equal
the state the pure `ratelimit.bucket` functions compute.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ratelimit import bucket
from ratelimit.keys import bucket_keys
from ratelimit.limiter import Limits
from ratelimit.memory import InMemoryRateLimiter
from ratelimit.redis_backend import RedisClient, RedisRateLimiter, connect_redis
from tests.integration.ratelimit.conftest import GENEROUS_TIMEOUT_SECONDS, FakeClockMs

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Op:
    kind: str  # "acquire" or "adjust"
    amount: int
    step_ms: int


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


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    limits = Limits(rpm=draw(limit_values()), tpm=draw(limit_values()))
    tpm = max(limits.tpm, 10)
    step = st.one_of(st.just(0), st.integers(0, 50), st.integers(0, 5_000), st.integers(0, 130_000))
    acquire = st.builds(
        Op,
        kind=st.just("acquire"),
        amount=st.one_of(st.integers(0, tpm // 3), st.integers(0, tpm + tpm // 4)),
        step_ms=step,
    )
    adjust = st.builds(
        Op, kind=st.just("adjust"), amount=st.integers(-2 * tpm, 2 * tpm), step_ms=step
    )
    ops = draw(st.lists(st.one_of(acquire, acquire, adjust), min_size=1, max_size=40))
    return Scenario(limits=limits, ops=ops)


async def stored_level(client: RedisClient, key: str) -> bucket.BucketLevel | None:
    level, updated = await client.hmget(key, ["l", "t"])
    if level is None or updated is None:
        return None
    return bucket.BucketLevel(level=int(level), updated_ms=int(updated))


class Reference:
    """The pure functions, driven directly, to predict the raw state Redis must hold."""

    def __init__(self, limits: Limits) -> None:
        self.limits = bucket.normalise_limits(limits)
        self.requests: bucket.BucketLevel | None = None
        self.tokens: bucket.BucketLevel | None = None

    def run(self, op: Op, now_ms: int) -> None:
        if op.kind == "acquire":
            outcome = bucket.acquire(
                self.limits,
                bucket.normalise_cost(op.amount),
                now_ms=now_ms,
                requests=self.requests,
                tokens=self.tokens,
            )
            self.requests = outcome.requests or self.requests
            self.tokens = outcome.tokens or self.tokens
        elif op.amount:
            delta = bucket.normalise_delta(op.amount, self.limits.tpm)
            self.tokens = (
                bucket.adjust(self.limits.tpm, delta, now_ms=now_ms, tokens=self.tokens)
                or self.tokens
            )

    def matches(self, limit: int, expected: bucket.BucketLevel | None, stored: object) -> bool:
        if stored is not None:
            return stored == expected
        # Redis may already have expired a key whose bucket is full; absent means full.
        return expected is None or expected.level >= bucket.capacity(limit)


async def run_scenario(client: RedisClient, scenario: Scenario) -> None:
    clock = FakeClockMs()
    memory = InMemoryRateLimiter(clock_ms=clock)
    redis = RedisRateLimiter(client, timeout_seconds=GENEROUS_TIMEOUT_SECONDS, test_clock_ms=clock)
    reference = Reference(scenario.limits)
    workspace = f"parity-{uuid.uuid4().hex}"
    requests_key, tokens_key = bucket_keys(workspace)
    for index, op in enumerate(scenario.ops):
        clock.advance(op.step_ms)
        if op.kind == "acquire":
            expected = await memory.acquire(workspace, scenario.limits, op.amount)
            actual = await redis.acquire(workspace, scenario.limits, op.amount)
            assert actual == expected, f"op {index}: {op}"
        else:
            await memory.adjust_tokens(workspace, scenario.limits, op.amount)
            await redis.adjust_tokens(workspace, scenario.limits, op.amount)
        reference.run(op, clock.now)
        limits = reference.limits
        assert reference.matches(
            limits.rpm, reference.requests, await stored_level(client, requests_key)
        ), f"request bucket after op {index}: {op}"
        assert reference.matches(
            limits.tpm, reference.tokens, await stored_level(client, tokens_key)
        ), f"token bucket after op {index}: {op}"


def test_lua_and_python_agree_exactly(redis_url: str) -> None:
    # A sync test with its own event loop: hypothesis re-runs the inner function many times,
    # and one loop and one client serve all of them.
    with asyncio.Runner() as runner:
        client = connect_redis(redis_url, timeout_seconds=GENEROUS_TIMEOUT_SECONDS)
        try:

            @settings(
                max_examples=60,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            )
            @given(scenario=scenarios())
            def check(scenario: Scenario) -> None:
                runner.run(run_scenario(client, scenario))

            check()
        finally:
            runner.run(client.aclose())
