"""Medians, summed error counts and ratios to the no-op server in the printed table."""

from __future__ import annotations

from typing import Any

from bench.backends import per_check
from bench.loadgen import LoadResult
from bench.report import Sample, render_tables, summarize


def _sample(rps: float, cpu: float | None, non_2xx: int) -> Sample:
    load = LoadResult(int(rps), 1.0, rps, 1.0, 2.0, 3.0, non_2xx, 0)
    return Sample(0, load, load, cpu, 50.0, None, None, {})


def _results(setups: dict[str, Any]) -> dict[str, Any]:
    return {
        "setups": setups,
        "plan": {"connections": 32, "closed_seconds": 8, "rounds": 3, "open_rate": 1000,
                 "open_seconds": 5},
        "machine": {"cpus": 2, "loadavg_before": (1.0, 1.0, 1.0),
                    "loadavg_after": (2.0, 2.0, 2.0), "envoy": "1.40.0"},
        "pg_statement_method": "pg_stat_statements",
        "seconds": 200.0,
    }  # fmt: skip


def test_summary_takes_medians_and_sums_every_non_2xx() -> None:
    summary = summarize([_sample(100, 300, 0), _sample(300, 100, 2), _sample(200, 200, 5)])

    assert summary["rps"] == 200
    assert summary["sidecar_cpu_us"] == 200
    assert summary["non_2xx"] == 7
    assert summary["redis_per_check"] is None


def test_table_shows_ratios_to_b_and_the_load_average() -> None:
    setups = {
        "b": {"title": "no-op", "median": summarize([_sample(4000, 200, 0)])},
        "d": {"title": "pg", "median": summarize([_sample(3000, 300, 4)])},
    }

    table = render_tables(_results(setups))

    d_row = next(line for line in table.splitlines() if line.startswith("| d. pg"))
    assert "| 3,000 | 0.75x |" in d_row
    assert "| 300 | 1.50x |" in d_row
    assert "4 / 0" in d_row
    assert "before 1.00/1.00/1.00, after 2.00/2.00/2.00" in table


def test_redis_calls_per_check_only_counts_what_changed() -> None:
    assert per_check({"evalsha": 10, "ping": 5}, {"evalsha": 30, "ping": 5, "hget": 4}, 20) == {
        "evalsha": 1.0,
        "hget": 0.2,
    }
