"""Prometheus metrics of the Redis rate-limit backend, registered on a registry handed in.

No global registry and no module-level collectors: the composition root creates one
`RateLimitMetrics(registry)` and passes it to the `RedisRateLimiter`.
"""

from __future__ import annotations

from enum import StrEnum

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ratelimit.breaker import BreakerState

REDIS_LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
)
"""Seconds: a healthy local Redis answers in well under a millisecond, the timeout is ~50 ms."""


class RedisErrorKind(StrEnum):
    """Why a Redis call failed; the value is the `kind` label."""

    TIMEOUT = "timeout"
    CONNECTION = "connection"
    OTHER = "other"
    """An error reply from Redis (OOM, NOSCRIPT that could not be fixed, a cluster error...)."""
    CLIENT = "client"
    """Any other exception from the Redis client (e.g. a cluster client closed under us)."""
    CIRCUIT_OPEN = "circuit_open"
    OVERLOAD = "overload"
    """This process was too busy to get the call done in time; Redis itself is not blamed."""


class RateLimitMetrics:
    """Redis latency, errors by kind, and the circuit breaker's state."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.redis_latency = Histogram(
            "authz_ratelimit_redis_seconds",
            "Latency of rate-limit calls to Redis, failures included.",
            ["operation"],
            buckets=REDIS_LATENCY_BUCKETS,
            registry=registry,
        )
        self.redis_errors = Counter(
            "authz_ratelimit_redis_errors",
            "Rate-limit calls that did not get an answer from Redis, by kind.",
            ["kind"],
            registry=registry,
        )
        self.circuit_state = Gauge(
            "authz_ratelimit_circuit_state",
            "Redis circuit breaker state: 0 closed, 1 half-open, 2 open.",
            registry=registry,
        )
        # Pre-create every label so dashboards see zeros, not missing series.
        for kind in RedisErrorKind:
            self.redis_errors.labels(kind=kind.value)
        self.circuit_state.set(BreakerState.CLOSED.value)

    def observe_latency(self, operation: str, seconds: float) -> None:
        """Record how long one Redis call took."""
        self.redis_latency.labels(operation=operation).observe(seconds)

    def count_error(self, kind: RedisErrorKind) -> None:
        """Count one failed (or short-circuited) call."""
        self.redis_errors.labels(kind=kind.value).inc()

    def set_circuit_state(self, state: BreakerState) -> None:
        """Export the breaker's state; pass as the breaker's `on_state_change`."""
        self.circuit_state.set(state.value)
