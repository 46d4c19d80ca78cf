"""A circuit breaker so a dead Redis costs microseconds per request instead of a timeout.

CLOSED: calls go through; `failure_threshold` consecutive failures open the circuit.
OPEN: calls are refused at once; after `cooldown_seconds` one probe call is let through.
HALF_OPEN: that probe is in flight and every other call is still refused; its success closes
the circuit, its failure opens it for another cool-down. A probe whose outcome is never
recorded (its caller was cancelled) expires after one cool-down, so the breaker cannot wedge.

The clock is injected, so tests drive the cool-down without sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import Enum


class BreakerState(Enum):
    """The breaker's state; the value is what the circuit-state gauge exports."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    """Counts consecutive failures of one backend and short-circuits calls while it is down."""

    def __init__(
        self,
        *,
        failure_threshold: int = 3,
        cooldown_seconds: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
        on_state_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if cooldown_seconds < 0:
            raise ValueError("cooldown_seconds must be >= 0")
        self._threshold = failure_threshold
        self._cooldown = cooldown_seconds
        self._clock = clock
        self._on_state_change = on_state_change
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._since = 0.0
        """When the circuit opened, or when the current probe started."""

    def copy(self) -> CircuitBreaker:
        """A new, closed breaker with the same threshold, cool-down and clock (one per Redis
        Cluster node); `on_state_change` is not copied, since it reports one breaker."""
        return CircuitBreaker(
            failure_threshold=self._threshold, cooldown_seconds=self._cooldown, clock=self._clock
        )

    @property
    def state(self) -> BreakerState:
        """The current state (an expired OPEN still reads OPEN until a call probes)."""
        return self._state

    def allow(self) -> bool:
        """Whether a call may go to the backend now; True in HALF_OPEN means "you are the probe"."""
        if self._state is BreakerState.CLOSED:
            return True
        if self._clock() - self._since < self._cooldown:
            return False
        # Cool-down over (or the previous probe vanished): this caller probes.
        self._since = self._clock()
        self._set_state(BreakerState.HALF_OPEN)
        return True

    def record_success(self) -> None:
        """A call succeeded: the backend is up."""
        self._failures = 0
        self._set_state(BreakerState.CLOSED)

    def record_failure(self) -> None:
        """A call failed; opens the circuit at the threshold, or at once if it was a probe."""
        self._failures += 1
        if self._state is BreakerState.HALF_OPEN or self._failures >= self._threshold:
            self._since = self._clock()
            self._set_state(BreakerState.OPEN)

    def _set_state(self, state: BreakerState) -> None:
        if state is self._state:
            return
        self._state = state
        if self._on_state_change is not None:
            self._on_state_change(state)
