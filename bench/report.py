"""Medians over rounds, and the tables `make bench` prints (pure: samples in, text out)."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from bench.loadgen import LoadResult

BASELINE = "b"  # ratios are to the no-op Python server, the honest ceiling


@dataclass
class Sample:
    """One setup in one round: both load runs and the per-request figures of the closed one."""

    round: int
    closed: LoadResult
    open: LoadResult
    sidecar_cpu_us: float | None
    envoy_cpu_us: float
    redis_per_check: float | None
    pg_per_check: float | None
    redis_by_command: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["closed"], data["open"] = self.closed.to_json(), self.open.to_json()
        return data


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(samples: Sequence[Sample]) -> dict[str, Any]:
    """Medians of every figure over the rounds; error counts are summed, never averaged."""

    def med(pick: Callable[[Sample], float | None]) -> float | None:
        return _median([pick(s) for s in samples])

    return {
        "rounds": len(samples),
        "rps": med(lambda s: s.closed.rps),
        "p50_ms": med(lambda s: s.closed.p50_ms),
        "p99_ms": med(lambda s: s.closed.p99_ms),
        "p999_ms": med(lambda s: s.closed.p999_ms),
        "sidecar_cpu_us": med(lambda s: s.sidecar_cpu_us),
        "envoy_cpu_us": med(lambda s: s.envoy_cpu_us),
        "redis_per_check": med(lambda s: s.redis_per_check),
        "pg_per_check": med(lambda s: s.pg_per_check),
        "redis_by_command": {
            command: _median([s.redis_by_command.get(command, 0.0) for s in samples])
            for command in sorted({c for s in samples for c in s.redis_by_command})
        },
        "non_2xx": sum(s.closed.non_2xx for s in samples),
        "socket_errors": sum(s.closed.socket_errors for s in samples),
        "open_rps": med(lambda s: s.open.rps),
        "open_p50_ms": med(lambda s: s.open.p50_ms),
        "open_p99_ms": med(lambda s: s.open.p99_ms),
        "open_p999_ms": med(lambda s: s.open.p999_ms),
        "open_non_2xx": sum(s.open.non_2xx for s in samples),
        "open_socket_errors": sum(s.open.socket_errors for s in samples),
    }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ratio(value: float | None, base: float | None) -> str:
    return "-" if value is None or not base else f"{value / base:.2f}x"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render_tables(results: dict[str, Any]) -> str:
    """Markdown tables: closed loop (throughput, CPU, backend calls), then the open loop."""
    setups: dict[str, Any] = results["setups"]
    base = setups.get(BASELINE, {}).get("median", {})
    plan, machine = results["plan"], results["machine"]
    closed_rows, open_rows = [], []
    for name, setup in setups.items():
        m = setup["median"]
        label = f"{name}. {setup['title']}"
        closed_rows.append([
            label, _fmt(m["rps"], ",.0f"), _ratio(m["rps"], base.get("rps")),
            _fmt(m["p50_ms"], ".2f"), _fmt(m["p99_ms"], ".2f"), _fmt(m["p999_ms"], ".2f"),
            _fmt(m["sidecar_cpu_us"], ".0f"),
            _ratio(m["sidecar_cpu_us"], base.get("sidecar_cpu_us")),
            _fmt(m["envoy_cpu_us"], ".0f"), _fmt(m["redis_per_check"], ".2f"),
            _fmt(m["pg_per_check"], ".4f"), f"{m['non_2xx']} / {m['socket_errors']}",
        ])  # fmt: skip
        open_rows.append([
            label, _fmt(m["open_rps"], ",.0f"), _fmt(m["open_p50_ms"], ".2f"),
            _fmt(m["open_p99_ms"], ".2f"), _fmt(m["open_p999_ms"], ".2f"),
            f"{m['open_non_2xx']} / {m['open_socket_errors']}",
        ])  # fmt: skip
    load = machine["loadavg_before"], machine["loadavg_after"]
    breakdown = [
        f"{name}: " + ", ".join(f"{cmd} {n:.2f}" for cmd, n in m["redis_by_command"].items())
        for name, m in ((n, s["median"]) for n, s in setups.items())
        if m["redis_by_command"]
    ]
    return "\n".join([
        f"Closed loop: wrk -t1 -c{plan['connections']} -d{plan['closed_seconds']:g}s, "
        f"median of {plan['rounds']} interleaved round(s); ratios to b, same run",
        "",
        _table(
            ["setup", "RPS", "RPS/b", "p50 ms", "p99 ms", "p99.9 ms", "sidecar CPU µs/req",
             "CPU/b", "Envoy CPU µs/req", "Redis cmds/Check", "PG stmts/Check",
             "non-2xx / socket errors"],
            closed_rows,
        ),
        "",
        f"Open loop: bench.openloop at {plan['open_rate']} rps for "
        f"{plan['open_seconds']:g}s, latency from each request's scheduled time",
        "",
        _table(
            ["setup", "achieved rps", "p50 ms", "p99 ms", "p99.9 ms", "non-2xx / errors"],
            open_rows,
        ),
        "",
        "Redis commands per Check, by command: " + ("; ".join(breakdown) or "none"),
        f"PG statements counted with: {results['pg_statement_method']}. "
        f"{machine['cpus']} CPUs, load average (1/5/15 min) before "
        f"{'/'.join(f'{x:.2f}' for x in load[0])}, after {'/'.join(f'{x:.2f}' for x in load[1])}; "
        f"Envoy {machine['envoy']}; {results['seconds']} s.",
    ])  # fmt: skip
