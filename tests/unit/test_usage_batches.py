"""The access-log path's batching: a message accounted at once bills what one entry at a time
would, writes are paced, and only signed entries reach the Observability page."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from authz.models import ModelPrice
from authz.usage.events import UsageEvent, parse_entry
from authz.usage.pacing import PacedWrites
from authz.usage.periods import HourSlots, hour_of, period_of
from authz.usage.pricing import (
    UNITS_PER_MICRO,
    estimate_micros,
    rate_units,
    spend_units,
)
from authz.usage.replay import MemoryReplayGuard
from ratelimit.limiter import Limits, Quota
from ratelimit.memory import InMemoryRateLimiter
from tests.support.clock import FakeClock
from tests.support.fakes import FakeStore, workspace
from tests.unit.test_usage import PRICED, START, entry
from tests.unit.test_usage import accountant as accountant_for

PRICE = ModelPrice("gpt", 0.15, 0.6)


def events() -> list[UsageEvent]:
    """Reports of two workspaces over two months, one unreported, one with an error."""
    made: list[UsageEvent] = []
    for n, (ws, usage, status, started) in enumerate(
        [
            ("ws_a", {"prompt_tokens": 1, "completion_tokens": 0}, 200, START),
            ("ws_a", {"prompt_tokens": 3, "completion_tokens": 7}, 200, START),
            ("ws_b", None, 200, START),
            ("ws_a", {"prompt_tokens": 5}, 200, START + timedelta(seconds=31)),  # December
            ("ws_b", None, 503, START),
            ("ws_b", {"prompt_tokens": 2, "completion_tokens": 2}, 200, START),
        ]
    ):
        log = entry({**PRICED, "workspace_id": ws, "reservation_id": f"r{n}"}, usage, status)
        log.common_properties.start_time.FromDatetime(started)
        event = parse_entry(log)
        assert event is not None
        made.append(event)
    return made


async def state(limiter: InMemoryRateLimiter, registry: CollectorRegistry) -> object:
    found = []
    for ws in ("ws_a", "ws_b"):
        for period in ("2026-11", "2026-12"):
            quota = Quota(period=period, token_quota=10**9, spend_cap_micros=10**12)
            result = await limiter.acquire(ws, Limits(rpm=0, tpm=1000), 0, quota=quota)
            assert result.quota is not None
            found.append(
                (result.tokens.remaining, result.quota.tokens_used, result.quota.spend_used_micros)
            )
    samples = sorted(
        (s.name, tuple(sorted(s.labels.items())), s.value)
        for family in registry.collect()
        if family.name.startswith(("authz_workspace", "authz_usage_reconciliations"))
        for s in family.samples
        if not s.name.endswith("_created")
    )
    return found, samples


async def test_a_batch_bills_what_one_entry_at_a_time_bills() -> None:
    outcomes = []
    for batched in (False, True):
        store = FakeStore()
        for ws in ("ws_a", "ws_b"):
            store.workspaces[ws] = workspace(ws, rpm=0, tpm=1000)
        limiter = InMemoryRateLimiter(clock_ms=lambda: 0)
        registry = CollectorRegistry()
        accountant = accountant_for(store, limiter, registry=registry)
        if batched:
            await accountant.record_batch(events())
        else:
            for event in events():
                await accountant.record(event)
        await accountant.flush()
        rows = sorted((r for batch in store.batches.values() for r in batch), key=repr)
        outcomes.append((rows, await state(limiter, registry)))
    assert outcomes[0] == outcomes[1]


def test_units_are_the_price_as_written() -> None:
    assert rate_units(0.15) == 15 * UNITS_PER_MICRO // 100
    assert rate_units(1e-18) == 1
    assert rate_units(1e-19) == 1  # finer than the unit: rounded up, never down
    assert spend_units(PRICE, 1, 1, 1) == (15 + 60 + 60) * UNITS_PER_MICRO // 100
    assert estimate_micros(PRICE, 3) == 2  # 1.8 micro-USD, rounded up
    assert spend_units(None, 10, 10, 10) == 0


@given(st.integers(-(10**10), 10**11))
def test_hour_slots_agree_with_hour_and_period(seconds: int) -> None:
    slots = HourSlots(keep=2)
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=seconds, microseconds=999_999)
    for _ in range(2):  # worked out, then remembered
        assert slots.of(moment) == (hour_of(moment), period_of(moment))


@given(st.integers(-(10**10), 10**11), st.integers(0, 999_999_999))
def test_start_times_read_as_protobuf_reads_them(seconds: int, nanos: int) -> None:
    log = entry(PRICED, None)
    log.common_properties.start_time.CopyFrom(Timestamp(seconds=seconds, nanos=nanos))
    event = parse_entry(log)
    assert event is not None
    assert event.started_at == log.common_properties.start_time.ToDatetime(tzinfo=UTC)


async def test_writes_inside_the_interval_become_one_at_its_end() -> None:
    clock = FakeClock(100.0)
    written: list[float] = []
    done = asyncio.Event()

    async def write() -> None:
        written.append(clock.now)
        done.set()

    paced = PacedWrites(write, interval=0.01, clock=lambda: clock.now)
    await paced.soon()
    assert written == [100.0]  # the first in a while goes now
    for _ in range(5):
        await paced.soon()
    assert written == [100.0]  # held ...
    done.clear()
    clock.now += 1
    await done.wait()  # ... and written once, when the interval ends
    assert written == [100.0, 101.0]
    await paced.soon()
    await paced.now()  # the stream ends: what was held is written now
    assert written == [100.0, 101.0, 101.0]


async def test_an_id_twice_in_one_message_is_a_replay() -> None:
    guard = MemoryReplayGuard(clock=FakeClock(0.0))
    reports = [("ws", "r1"), ("ws", "r2"), ("ws_other", "r1")]
    assert await guard.first_reports(reports, ttl_s=10) == [True, True, False]
    assert await guard.first_reports([("ws", "r2"), ("ws", "r3")], ttl_s=10) == [False, True]
