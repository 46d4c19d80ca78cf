"""A ChangeSink that records what a store's change feed delivers, and a way to wait for it."""

from __future__ import annotations

import asyncio

from authz.store.base import Change


class Recorder:
    def __init__(self) -> None:
        self.changes: list[Change] = []
        self.resets = 0
        self.event = asyncio.Event()

    def on_change(self, change: Change) -> None:
        self.changes.append(change)
        self.event.set()

    def on_reset(self) -> None:
        self.resets += 1
        self.event.set()


async def wait_for(recorder: Recorder, predicate: object, timeout: float = 5.0) -> None:
    assert callable(predicate)
    async with asyncio.timeout(timeout):
        while not predicate():
            recorder.event.clear()
            await recorder.event.wait()
