"""Overuse is carried as debt, not forgiven (issue 17, finding 6), on both twins.

The same workloads (requests whose real usage runs far past, or short of, their reservation,
several in flight, reported through `record_usage` and `adjust_tokens`) run on
`InMemoryRateLimiter` and on the Lua scripts in real Redis, each on its own fake clock. Both
must keep the bound at every admission (tokens charged over any window ending then <= TPM x
window + one bucket, the 10-minute window included) and give identical answers, retry-after
included: waiting exactly the retry-after admits, a millisecond less does not.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, example, given, settings

from ratelimit.durations import retry_after_header
from ratelimit.limiter import LimitKind, Limits, QuotaState, RateLimiter
from ratelimit.memory import InMemoryRateLimiter
from ratelimit.redis_backend import RedisClient, connect_redis
from tests.integration.ratelimit.conftest import GENEROUS_TIMEOUT_SECONDS, T0_MS, FakeClockMs
from tests.support.clocked_redis import AgingClockedRedisRateLimiter
from tests.support.token_debt import PERIOD, WINDOW_MS, Ledger, Step, Workload, drive, workloads

pytestmark = pytest.mark.integration


def test_both_twins_carry_debt_and_agree(redis_url: str) -> None:
    # A sync test with its own event loop, as test_parity: one loop and one client serve every
    # example hypothesis runs.
    with asyncio.Runner() as runner:
        client = connect_redis(redis_url, timeout_seconds=GENEROUS_TIMEOUT_SECONDS)
        try:

            @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
            @given(workload=workloads())
            @example(workload=YEAR_LONG_DEBT)
            def check(workload: Workload) -> None:
                runner.run(run_on_both(client, workload))

            check()
        finally:
            runner.run(client.aclose())


YEAR_LONG_DEBT = Workload(
    limits=Limits(rpm=0, tpm=83),
    steps=[
        Step(kind="acquire", amount=0, usage=0),
        Step(kind="report", amount=2, counted=False),
        Step(kind="report", amount=7, counted=True),
        Step(kind="acquire", amount=0, usage=0),
        Step(kind="acquire", amount=0, usage=0),
        Step(kind="acquire", amount=86, usage=0),
        Step(kind="wait", amount=59880),
        Step(kind="acquire", amount=0, usage=56666564),
        Step(kind="report", amount=5, counted=True),
        Step(kind="retry", usage=39),
        Step(kind="acquire", amount=0, usage=151),
        Step(kind="report", amount=3, counted=True),
        Step(kind="acquire", amount=0, usage=1982),
        Step(kind="retry", usage=647),
        Step(kind="acquire", amount=0, usage=0),
        Step(kind="retry", usage=0),
        Step(kind="report", amount=2, counted=True),
        Step(kind="report", amount=7, counted=False),
        Step(kind="wait", amount=709),
        Step(kind="acquire", amount=79, usage=3),
        Step(kind="acquire", amount=0, usage=0),
        Step(kind="report", amount=3, counted=True),
    ],
)
"""A debt of 56 666 564 tokens at TPM 83: its retry waits 474 days, past the month counters'
40-day TTL, so both twins must have forgotten them (the next report says `known=False`). Found
by hypothesis when the Redis keys still expired on real time, not the test clock."""


async def run_on_both(client: RedisClient, workload: Workload) -> None:
    memory_clock, redis_clock = FakeClockMs(), FakeClockMs()
    memory = InMemoryRateLimiter(clock_ms=memory_clock)
    redis = AgingClockedRedisRateLimiter(
        client, timeout_seconds=GENEROUS_TIMEOUT_SECONDS, clock_ms=redis_clock
    )
    workspace = f"debt-{uuid.uuid4().hex}"
    expected = await drive(memory, memory_clock, workload, workspace=workspace)
    actual = await drive(redis, redis_clock, workload, workspace=workspace)
    assert actual == expected


@pytest.fixture(params=["memory", "redis"])
def twin(request: pytest.FixtureRequest, clock_ms: FakeClockMs) -> Iterator[RateLimiter]:
    if request.param == "memory":
        yield InMemoryRateLimiter(clock_ms=clock_ms)
        return
    client: RedisClient = request.getfixturevalue("redis_client")
    yield AgingClockedRedisRateLimiter(
        client, timeout_seconds=GENEROUS_TIMEOUT_SECONDS, clock_ms=clock_ms
    )


async def test_the_issue_case_waits_for_the_debt_on_both_twins(
    twin: RateLimiter, clock_ms: FakeClockMs, workspace_id: str
) -> None:
    # TPM 2000; each request reserves 21 + 40 tokens and the upstream answers 100 000
    # completion tokens. The old clamp admitted it at 0, 63 and 125 s: 300 063 tokens.
    tpm, estimate, usage = 2000, 61, 100_021
    limits = Limits(rpm=0, tpm=tpm)
    ledger = Ledger(tpm)
    admitted = []
    for at_ms in (0, 1_000, 63_000, 125_000):
        clock_ms.now = T0_MS + at_ms
        if at_ms == 1_000:  # the first response's usage comes in
            state = await twin.record_usage(
                workspace_id,
                limits,
                period=PERIOD,
                tpm_delta=usage - estimate,
                tokens=usage,
                spend_micros=0,
            )
            assert state == QuotaState(PERIOD, usage, 0, known=False)
            ledger.reported(at_ms, usage - estimate)
            continue
        result = await twin.acquire(workspace_id, limits, estimate)
        if result.allowed:
            admitted.append(at_ms)
            ledger.admitted(at_ms, estimate)
    assert admitted == [0]
    assert result.denied_by is LimitKind.TOKENS
    assert retry_after_header(result.retry_after_seconds) == "2818"

    paid_ms = 125_000 + round(result.retry_after_seconds * 1000)
    clock_ms.now = T0_MS + paid_ms - 1
    assert not (await twin.acquire(workspace_id, limits, estimate)).allowed
    clock_ms.now = T0_MS + paid_ms
    assert (await twin.acquire(workspace_id, limits, estimate)).allowed
    ledger.admitted(paid_ms, estimate)
    assert paid_ms == (usage - tpm + estimate) * 30  # 49 minutes after the first request
    assert ledger.in_window(paid_ms - WINDOW_MS, paid_ms) == estimate
