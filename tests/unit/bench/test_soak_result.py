"""The soak's verdicts: each property it checks is named when it does not hold."""

from __future__ import annotations

from dataclasses import replace

from bench.loadgen import LoadResult
from bench.soak_result import SoakPlan, SoakResult

PLAN = SoakPlan(replicas=3, seconds=10, rate=10, limit_rpm=60, burst=100)
LOAD = LoadResult(100, 10.0, 10.0, 1.0, 2.0, 3.0, non_2xx=0, socket_errors=0)


def _passing() -> SoakResult:
    return SoakResult(
        PLAN,
        load=LOAD,
        sent=100,
        backends_peak=3 + 4,
        backend_samples=50,
        revocation_s=[0.01, 0.02, 0.03],
        burst_statuses={200: 61, 429: 39},
        burst_seconds=1.5,  # refill: 60/60 per second, so at most 61
        ledger_requests=100,
        limited_ledger_requests=61,
    )


def test_a_run_where_everything_held_passes() -> None:
    result = _passing()
    assert result.problems() == []
    assert result.render().endswith("RESULT       pass")


def test_each_failed_property_is_named() -> None:
    result = replace(
        _passing(),
        backends_peak=8,
        revocation_s=[0.01, 1.2],
        burst_statuses={200: 62, 429: 37, 503: 1},
        ledger_requests=98,
        pool_gave_up=2,
        load=replace(LOAD, non_2xx=1),
    )
    assert result.problems() == [
        "8 PostgreSQL backends, budget 7",
        "revocation applied by 2/3 replicas, 1 of them 1 s or later",
        "over-admission: 62 > 61",
        "burst answers other than 200/429: {200: 62, 429: 37, 503: 1}",
        "ledger 98 requests for 99 2xx",
        "ledger 61 for 62 admitted",
        "2 calls found the pool exhausted",
        f"valid-key load not all 2xx: {replace(LOAD, non_2xx=1)}",
    ]
