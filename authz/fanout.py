"""One change feed, several listeners: the key cache and the price table."""

from __future__ import annotations

from collections.abc import Sequence

from authz.store.base import Change, ChangeSink


class FanOut:
    """A ChangeSink that forwards every change and reset to each sink, in order."""

    def __init__(self, sinks: Sequence[ChangeSink]) -> None:
        self._sinks = tuple(sinks)

    def on_change(self, change: Change) -> None:
        for sink in self._sinks:
            sink.on_change(change)

    def on_reset(self) -> None:
        for sink in self._sinks:
            sink.on_reset()
