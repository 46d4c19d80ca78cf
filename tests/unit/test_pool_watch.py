"""The PostgreSQL pool's metrics and its readiness reason (PoolWatch, as the store reports)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from authz.health import PoolWatch
from authz.metrics import Metrics


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_connections_in_use_waiters_and_size_are_gauges() -> None:
    registry = CollectorRegistry()
    watch = PoolWatch(Metrics(registry))
    watch.sized(2)
    watch.used(in_use=2, waiting=3)
    assert _sample(registry, "authz_db_pool_size") == 2
    assert _sample(registry, "authz_db_pool_connections_in_use") == 2
    assert _sample(registry, "authz_db_pool_acquires_waiting") == 3
    watch.used(in_use=1, waiting=0)
    assert _sample(registry, "authz_db_pool_connections_in_use") == 1
    assert _sample(registry, "authz_db_pool_acquires_waiting") == 0


def test_a_busy_pool_is_counted_but_stays_ready() -> None:
    registry = CollectorRegistry()
    watch = PoolWatch(Metrics(registry))
    watch.sized(2)
    for _ in range(5):
        watch.waited(acquired=True)
    assert _sample(registry, "authz_db_pool_waits_total", result="acquired") == 5
    assert watch.problem() is None


def test_calls_that_gave_up_make_a_readiness_reason_until_the_next_probe() -> None:
    registry = CollectorRegistry()
    watch = PoolWatch(Metrics(registry))
    watch.sized(2)
    watch.waited(acquired=False)
    watch.waited(acquired=False)
    assert _sample(registry, "authz_db_pool_waits_total", result="gave_up") == 2
    assert watch.problem() == (
        "exhausted: 2 call(s) gave up waiting for one of its 2 connections "
        "(AUTHZ_DB_POOL_SIZE, AUTHZ_DB_TIMEOUT_MS)"
    )
    # Nothing gave up since that probe: ready again, the counter keeps the history.
    assert watch.problem() is None
    assert _sample(registry, "authz_db_pool_waits_total", result="gave_up") == 2
