"""One change feed, several listeners: the key cache and the price table."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from authz.store.base import Change, ChangeSink

log = logging.getLogger(__name__)


class FanOut:
    """A ChangeSink that forwards every change and reset to each sink, in order."""

    def __init__(self, sinks: Sequence[ChangeSink]) -> None:
        self._sinks = tuple(sinks)

    def on_change(self, change: Change) -> None:
        for sink in self._sinks:
            sink.on_change(change)
        # Its timestamp is when this replica applied the change: how tests (and operators)
        # measure revocation latency from the change's commit, not from some client's clock.
        log.debug("change feed: %s change applied", change.kind.value)

    def on_reset(self) -> None:
        for sink in self._sinks:
            sink.on_reset()
        # A reset (after a feed outage) drops every cache: it applies every change at once.
        log.debug("change feed: reset applied")
