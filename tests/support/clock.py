"""The one hand-moved clock of the unit tests: nothing sleeps to let time pass."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Generic, TypeVar

N = TypeVar("N", int, float)


class FakeClock(Generic[N]):
    """Returns `now` when called; tests set or advance `now` themselves.

    The unit is the caller's: seconds (`FakeClock(0.0)`, for caches, deadlines and the wall
    clock) or whole milliseconds (`FakeClock(5_000_000)`, for the in-process limiter). A seconds
    clock also drives a millisecond consumer through `ms`, and a consumer of aware UTC datetimes
    (the console's sessions) through `utc`, so one clock can move them all.
    """

    def __init__(self, now: N) -> None:
        self.now: N = now

    def __call__(self) -> N:
        return self.now

    def ms(self) -> int:
        """`now` (in seconds) as whole milliseconds."""
        return round(self.now * 1000)

    def utc(self) -> datetime:
        """`now` (seconds since the epoch) as an aware UTC datetime."""
        return datetime.fromtimestamp(self.now, UTC)
