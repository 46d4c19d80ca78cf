"""Metrics register on the registry handed in, with every label pre-created."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from ratelimit.breaker import BreakerState
from ratelimit.metrics import RateLimitMetrics, RedisErrorKind


def test_metrics_live_on_their_own_registry() -> None:
    first, second = CollectorRegistry(), CollectorRegistry()
    metrics = RateLimitMetrics(first)
    RateLimitMetrics(second)  # no clash: nothing is global
    metrics.observe_latency("acquire", 0.0003)
    metrics.count_error(RedisErrorKind.TIMEOUT)
    metrics.set_circuit_state(BreakerState.OPEN)
    value = first.get_sample_value
    assert value("authz_ratelimit_redis_seconds_count", {"operation": "acquire"}) == 1
    assert value("authz_ratelimit_redis_errors_total", {"kind": "timeout"}) == 1
    assert value("authz_ratelimit_redis_errors_total", {"kind": "circuit_open"}) == 0
    assert value("authz_ratelimit_circuit_state") == 2
    assert second.get_sample_value("authz_ratelimit_redis_errors_total", {"kind": "timeout"}) == 0
