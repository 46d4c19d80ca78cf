"""A bounded LRU with per-entry expiry and an injected clock.

Expired entries are kept (until pushed out by newer ones) so they can still serve while the
database is down ("stale if error"); callers decide whether stale is acceptable.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    """LRU of at most `max_size` entries, each fresh for `ttl` seconds after it was stored."""

    __slots__ = ("_clock", "_entries", "_max_size", "_max_stale", "_ttl")

    def __init__(
        self, *, max_size: int, ttl: float, clock: Callable[[], float], max_stale: float = 0.0
    ) -> None:
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self._max_size = max_size
        self._ttl = ttl
        self._max_stale = max_stale
        self._clock = clock

    def get(self, key: K) -> tuple[V, bool] | None:
        """(value, fresh) or None; stale entries come back until `max_stale` past expiry."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        now = self._clock()
        if entry[0] + self._max_stale <= now:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[1], entry[0] > now

    def put(self, key: K, value: V) -> None:
        self._entries[key] = (self._clock() + self._ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_size:
            self._entries.popitem(last=False)

    def pop(self, key: K) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
