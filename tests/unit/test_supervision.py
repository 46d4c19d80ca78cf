"""A background task that crashes is restarted, and readiness is down while it waits."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from authz.app import build
from authz.health import AUTHZ_SERVICE
from authz.server import start
from authz.supervisor import Supervisor
from ratelimit.memory import InMemoryRateLimiter
from tests.support.clock import FakeClock
from tests.support.fakes import FakeStore
from tests.unit.conftest import UNIT_SETTINGS

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class CrashingStore(FakeStore):
    """A FakeStore whose `method` raises a bug-like error on its `call`-th call."""

    def __init__(self, method: str, call: int) -> None:
        super().__init__()
        self.crash_method = method
        self.crash_call = call
        self.calls = 0

    def _maybe_crash(self, method: str) -> None:
        if method == self.crash_method:
            self.calls += 1
            if self.calls == self.crash_call:
                raise RuntimeError(f"injected crash in {method}")

    async def ping(self) -> None:
        self._maybe_crash("ping")
        await super().ping()

    async def list_prices(self) -> Any:
        self._maybe_crash("list_prices")
        return await super().list_prices()

    async def record_key_use(self, last_used: Any) -> None:
        self._maybe_crash("record_key_use")
        await super().record_key_use(last_used)

    async def watch_changes(self, sink: Any) -> None:
        self._maybe_crash("watch_changes")
        await super().watch_changes(sink)


async def eventually(condition: Callable[[], Awaitable[bool]]) -> None:
    """Wait for `condition` with a generous ceiling (events inside one process, no bound)."""
    async with asyncio.timeout(10):
        while not await condition():
            await asyncio.sleep(0.005)


@pytest.mark.parametrize(
    ("task", "method", "call"),
    [
        ("change-feed", "watch_changes", 1),
        ("ledger", "list_prices", 1),
        # The first ping is start-up's own probe; the readiness loop makes the second.
        ("readiness", "ping", 2),
        ("last-used", "record_key_use", 1),
    ],
)
async def test_crashed_task_restarts_and_readiness_is_down_meanwhile(
    task: str, method: str, call: int, caplog: pytest.LogCaptureFixture
) -> None:
    store = CrashingStore(method, call)
    registry = CollectorRegistry()
    backoff_entered = asyncio.Event()
    release = asyncio.Event()
    delays: list[float] = []

    async def restart_sleep(delay: float) -> None:
        delays.append(delay)
        backoff_entered.set()
        await release.wait()

    clock = FakeClock(1000.0)
    settings = replace(UNIT_SETTINGS, last_used_flush_s=0.001, ledger_flush_s=0.001)
    app = await build(
        settings,
        store=store,
        limiter=InMemoryRateLimiter(clock_ms=clock.ms),
        clock=clock,
        registry=registry,
        restart_sleep=restart_sleep,
    )
    running = await start(app, serve_metrics=False)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.grpc_port}")
    health = health_pb2_grpc.HealthStub(channel)

    async def status() -> int:
        answer = await health.Check(health_pb2.HealthCheckRequest(service=AUTHZ_SERVICE))
        return int(answer.status)

    def sample(name: str) -> float | None:
        return registry.get_sample_value(name, {"task": task})

    try:
        app.last_used.touch("key_1")
        with caplog.at_level(logging.WARNING):
            async with asyncio.timeout(10):
                await backoff_entered.wait()
            assert await status() == NOT_SERVING
            assert sample("authz_background_task_up") == 0
            assert sample("authz_background_task_restarts_total") == 1
            assert f"background task {task} crashed" in caplog.text
            assert f"NOT_SERVING (background task {task}: down)" in caplog.text

            release.set()

            async def serving_again() -> bool:
                return bool(await status() == SERVING)

            await eventually(serving_again)
        assert sample("authz_background_task_up") == 1
        assert delays == [0.1]
        assert not any(t.done() for t in running.background)
    finally:
        await channel.close(None)
        await app.server.stop(None)
        await app.supervisor.stop()


async def test_backoff_doubles_while_a_task_keeps_crashing() -> None:
    registry = CollectorRegistry()
    app = await build(UNIT_SETTINGS, store=FakeStore(), registry=registry)
    delays: list[float] = []
    done = asyncio.Event()

    async def sleep(delay: float) -> None:
        delays.append(delay)
        if len(delays) == 8:
            done.set()
            await asyncio.Event().wait()

    async def always_crashes() -> None:
        raise RuntimeError("bug")

    supervisor = Supervisor(
        readiness=app.readiness, metrics=app.metrics, sleep=sleep, clock=FakeClock(0.0)
    )
    supervisor.start("flaky", always_crashes)
    async with asyncio.timeout(10):
        await done.wait()
    await supervisor.stop()
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0]
    assert registry.get_sample_value("authz_background_task_restarts_total", {"task": "flaky"}) == 8


async def test_stop_ends_a_job_that_lost_its_first_cancellation() -> None:
    """Python 3.11's `asyncio.wait_for` drops a cancellation that lands as its inner call
    completes (redis-py writes under it): the job then runs on as if never cancelled."""
    app = await build(UNIT_SETTINGS, store=FakeStore(), limiter=InMemoryRateLimiter())
    supervisor = Supervisor(readiness=app.readiness, metrics=app.metrics)
    rounds = 0
    lost = asyncio.Event()

    async def probe_loop() -> None:
        nonlocal rounds
        while True:
            rounds += 1
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if lost.is_set():
                    raise
                lost.set()  # the first one is lost, as wait_for loses it

    supervisor.start("readiness", probe_loop)
    while rounds == 0:
        await asyncio.sleep(0)
    async with asyncio.timeout(10):
        await supervisor.stop()
    assert lost.is_set()
    assert all(task.done() for task in supervisor.tasks)
