"""Event-loop lag and backend progress, so time the loop spent elsewhere is not blamed on Redis.

A saturated event loop leaves Redis replies waiting in the socket: the reply came back in a
millisecond, but the coroutine reading it ran 80 ms later. Counted as a Redis timeout, that
opens the breaker and sheds healthy traffic. `LoopLag` keeps a running total of how late the loop
ran its callbacks (a ticker measures its own lateness); a deadline then grants a call its Redis
budget net of the lag that happened while it was in flight, up to a hard wall-clock ceiling.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

TICK_SECONDS = 0.005
"""How often the ticker runs; 200 cheap callbacks a second."""

MAX_EXTENSIONS = 2
"""A call may get this many extra budgets while the backend answers others (then it is this
call that is stuck, e.g. on a connection its client closed)."""

TOLERANCE_SECONDS = 0.001
"""Lateness below this is ordinary scheduling jitter, not lag."""


class LoopLag:
    """The total lag of one event loop, in seconds, measured by a self-rescheduling ticker.

    The ticker starts on first use inside a running loop and follows the loop if the owner is
    used from another one (tests run one limiter in several loops).
    """

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._expected = 0.0
        self._total = 0.0

    def total(self) -> float:
        """Lag so far, including the lateness of a tick that is overdue right now."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop or self._handle is None:
            self._start(loop)
        return self._total + self._late(loop.time())

    def stop(self) -> None:
        """Stop the ticker (it restarts on the next `total()`)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _late(self, now: float) -> float:
        late = now - self._expected
        return late if late > TOLERANCE_SECONDS else 0.0

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.stop()
        self._loop = loop
        self._schedule(loop.time())

    def _schedule(self, now: float) -> None:
        assert self._loop is not None
        self._expected = now + TICK_SECONDS
        self._handle = self._loop.call_at(self._expected, self._tick)

    def _tick(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        self._total += self._late(now)
        self._schedule(now)


class NetDeadline:
    """Expires an `asyncio.timeout` once the backend has had `budget` seconds to answer.

    Time the loop spent lagging does not count, nor does a stretch in which the backend was
    seen answering other calls (`answered_since(t)`: some reply arrived after loop time t): then
    the delay is this process' queueing, not the backend's. The timeout's own schedule stays the
    wall-clock ceiling; this only brings it forward.
    """

    def __init__(
        self,
        timeout: asyncio.Timeout,
        lag: LoopLag,
        *,
        budget: float,
        answered_since: Callable[[float], bool],
    ) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._timeout = timeout
        self._lag = lag
        self._budget = budget
        self._answered_since = answered_since
        self._extensions = 0
        self._started = loop.time()
        self._lag_at_start = lag.total()
        self._handle = loop.call_at(self._started + budget, self._fire)
        self.expired = False
        """Whether the budget ran out (rather than the wall-clock ceiling, or not at all)."""

    def net_elapsed(self) -> float:
        """Seconds since the start, minus the loop's lag since then."""
        lag = self._lag.total() - self._lag_at_start
        return self._loop.time() - self._started - max(lag, 0.0)

    def cancel(self) -> None:
        """The call ended: drop the timer."""
        self._handle.cancel()

    def _fire(self) -> None:
        now = self._loop.time()
        left = self._budget - self.net_elapsed()
        if (
            left <= 0
            and self._extensions < MAX_EXTENSIONS
            and self._answered_since(now - self._budget)
        ):
            self._extensions += 1
            left = self._budget  # the backend is answering: give this call another budget
        if left <= 0:
            if self._timeout.expired():  # the wall-clock ceiling got there first
                return
            self.expired = True
            self._timeout.reschedule(now)  # expires at once: the call is cancelled
            return
        self._handle = self._loop.call_at(now + left, self._fire)
