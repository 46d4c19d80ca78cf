"""NetDeadline: a stalled event loop is not counted as the backend's time; a silent one is."""

from __future__ import annotations

import asyncio
import time

import pytest

from ratelimit.loop_lag import LoopLag, NetDeadline

BUDGET = 0.05


def never_answered(_since: float) -> bool:
    return False


async def run_with_deadline(
    work: asyncio.Future[str] | asyncio.Task[str], started: list[NetDeadline] | None = None
) -> NetDeadline:
    """`work` under a BUDGET deadline and a 5 s ceiling; the deadline also goes into `started`,
    for a caller whose work times out."""
    async with asyncio.timeout(5.0) as timeout:
        deadline = NetDeadline(timeout, LoopLag(), budget=BUDGET, answered_since=never_answered)
        if started is not None:
            started.append(deadline)
        try:
            await work
        finally:
            deadline.cancel()
    return deadline


async def test_a_silent_backend_expires_at_the_budget() -> None:
    never: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    started = time.perf_counter()
    deadlines: list[NetDeadline] = []
    with pytest.raises(TimeoutError):
        await run_with_deadline(never, deadlines)
    # The budget ended it (not the 5 s ceiling), and not before the budget had passed.
    assert [deadline.expired for deadline in deadlines] == [True]
    assert time.perf_counter() - started >= BUDGET * 0.8


async def test_a_stalled_loop_does_not_use_up_the_budget() -> None:
    async def answer_after_a_stall() -> str:
        await asyncio.sleep(0)
        time.sleep(BUDGET * 1.6)  # the loop is stalled: nothing else can run meanwhile
        await asyncio.sleep(0)
        return "reply"

    deadline = await run_with_deadline(asyncio.ensure_future(answer_after_a_stall()))
    assert not deadline.expired


async def test_a_backend_that_answers_others_gets_more_time() -> None:
    loop = asyncio.get_running_loop()
    slow = loop.create_future()
    loop.call_later(BUDGET * 2, slow.set_result, "reply")
    async with asyncio.timeout(5.0) as timeout:
        deadline = NetDeadline(timeout, LoopLag(), budget=BUDGET, answered_since=lambda since: True)
        assert await slow == "reply"
        deadline.cancel()
    assert not deadline.expired
