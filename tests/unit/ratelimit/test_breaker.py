"""The circuit breaker's state machine, driven by an injected clock."""

from __future__ import annotations

import pytest

from ratelimit.breaker import BreakerState, CircuitBreaker
from tests.support.clock import FakeClock


def state(breaker: CircuitBreaker) -> BreakerState:
    """Read the state through a call, so mypy does not narrow it across transitions."""
    return breaker.state


@pytest.fixture
def clock() -> FakeClock[float]:
    return FakeClock(100.0)


@pytest.fixture
def changes() -> list[BreakerState]:
    return []


@pytest.fixture
def breaker(clock: FakeClock[float], changes: list[BreakerState]) -> CircuitBreaker:
    return CircuitBreaker(
        failure_threshold=3, cooldown_seconds=0.25, clock=clock, on_state_change=changes.append
    )


def test_starts_closed_and_allows(breaker: CircuitBreaker) -> None:
    assert state(breaker) is BreakerState.CLOSED
    assert breaker.allow()


def test_opens_after_threshold_consecutive_failures(
    breaker: CircuitBreaker, changes: list[BreakerState]
) -> None:
    breaker.record_failure()
    breaker.record_failure()
    assert state(breaker) is BreakerState.CLOSED
    breaker.record_failure()
    assert state(breaker) is BreakerState.OPEN
    assert not breaker.allow()
    assert changes == [BreakerState.OPEN]


def test_a_success_resets_the_failure_count(breaker: CircuitBreaker) -> None:
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    breaker.record_failure()
    assert state(breaker) is BreakerState.CLOSED


def open_it(breaker: CircuitBreaker) -> None:
    for _ in range(3):
        breaker.record_failure()


def test_after_cooldown_exactly_one_probe_goes_through(
    breaker: CircuitBreaker, clock: FakeClock[float]
) -> None:
    open_it(breaker)
    clock.now += 0.249
    assert not breaker.allow()
    clock.now += 0.001
    assert breaker.allow()
    assert state(breaker) is BreakerState.HALF_OPEN
    assert not breaker.allow()
    assert not breaker.allow()


def test_probe_success_closes(
    breaker: CircuitBreaker, clock: FakeClock[float], changes: list[BreakerState]
) -> None:
    open_it(breaker)
    clock.now += 0.25
    assert breaker.allow()
    breaker.record_success()
    assert state(breaker) is BreakerState.CLOSED
    assert breaker.allow()
    assert changes == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]


def test_probe_failure_reopens_for_another_cooldown(
    breaker: CircuitBreaker, clock: FakeClock[float]
) -> None:
    open_it(breaker)
    clock.now += 0.25
    assert breaker.allow()
    breaker.record_failure()
    assert state(breaker) is BreakerState.OPEN
    clock.now += 0.2
    assert not breaker.allow()
    clock.now += 0.05
    assert breaker.allow()


def test_a_lost_probe_expires_after_a_cooldown(
    breaker: CircuitBreaker, clock: FakeClock[float]
) -> None:
    open_it(breaker)
    clock.now += 0.25
    assert breaker.allow()  # this probe's caller is cancelled and never reports back
    clock.now += 0.1
    assert not breaker.allow()
    clock.now += 0.15
    assert breaker.allow()


def test_threshold_one_opens_on_first_failure(clock: FakeClock[float]) -> None:
    breaker = CircuitBreaker(failure_threshold=1, cooldown_seconds=1, clock=clock)
    breaker.record_failure()
    assert state(breaker) is BreakerState.OPEN


@pytest.mark.parametrize(
    ("threshold", "cooldown", "message"),
    [(0, 1.0, "failure_threshold"), (1, -1.0, "cooldown_seconds")],
)
def test_rejects_bad_settings(threshold: int, cooldown: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CircuitBreaker(failure_threshold=threshold, cooldown_seconds=cooldown)
