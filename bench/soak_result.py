"""What `make soak` measured (bench/soak.py), the properties it must show, and its report.

No processes and no I/O: figures in, verdicts and text out.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, field

from bench.loadgen import LoadResult
from tests.support.pgbouncer import SERVER_POOL_SIZE

POOL_SIZE = 2  # AUTHZ_DB_POOL_SIZE's default: what a fleet without PgBouncer would hold


@dataclass(frozen=True, slots=True)
class Costs:
    """What the load window cost: all replicas' CPU, Redis commands, PostgreSQL statements."""

    requests: int
    seconds: float
    sidecar_cpu_s: float
    redis_commands: int
    pg_statements: int
    pg_method: str
    pg_transactions: int

    def idle_line(self, replicas: int) -> str:
        seconds = max(self.seconds, 1e-9) * replicas
        return (
            f"per replica {self.sidecar_cpu_s / seconds:.1%} of a core, "
            f"{self.pg_transactions / seconds:.1f} PostgreSQL transactions/s, "
            f"{self.redis_commands / seconds:.1f} Redis commands/s (no traffic, "
            f"{self.seconds:.0f} s)"
        )

    def line(self) -> str:
        per, seconds = max(self.requests, 1), max(self.seconds, 1e-9)
        return (
            f"sidecar CPU {self.sidecar_cpu_s / per * 1e6:,.0f} µs per request (all replicas, "
            f"idle work included), Redis {self.redis_commands / per:.1f} commands per request, "
            f"PostgreSQL {self.pg_transactions / seconds:,.0f} transactions/s and "
            f"{self.pg_statements / seconds:,.0f} statements/s ({self.pg_method}) in all, "
            f"{self.pg_statements / per:.2f} statements per request"
        )


@dataclass(frozen=True, slots=True)
class SoakPlan:
    """How many replicas, how long, how hard; and the rate-limited workspace's burst."""

    replicas: int = 20
    seconds: float = 60.0
    rate: int = 200
    connections: int = 32
    limit_rpm: int = 100
    burst: int = 300
    settings: dict[str, str] = field(default_factory=dict)
    """Sidecar settings changed from the shipped defaults (none for `make soak`)."""


@dataclass
class SoakResult:
    """What the soak measured; `problems()` names every property that did not hold."""

    plan: SoakPlan
    load: LoadResult | None = None
    sent: int = 0
    backends_peak: int = 0
    backend_samples: int = 0
    revocation_s: list[float] = field(default_factory=list)
    burst_statuses: dict[int, int] = field(default_factory=dict)
    burst_seconds: float = 0.0
    pool_gave_up: float = 0.0
    """Database calls that timed out waiting for a pool connection, all replicas together."""
    ledger_requests: int = 0
    limited_ledger_requests: int = 0
    costs: Costs | None = None
    idle: Costs | None = None
    """The same counters over a few seconds without traffic, before the load."""
    envoy: dict[str, int] = field(default_factory=dict)
    """Envoy's non-zero ext_authz (ok, denied, error) and access-log (written, dropped)
    counters."""
    warnings: dict[str, int] = field(default_factory=dict)
    """Warning and error lines the replicas logged, by message, with how often."""

    @property
    def answered_2xx(self) -> int:
        return 0 if self.load is None else self.load.requests - self.load.non_2xx

    loadavg: tuple[tuple[float, ...], tuple[float, ...]] = ((), ())

    @property
    def budget(self) -> int:
        """Backends allowed: one LISTEN per process, plus PgBouncer's server pool."""
        return self.plan.replicas + SERVER_POOL_SIZE

    @property
    def admitted(self) -> int:
        return self.burst_statuses.get(200, 0)

    @property
    def most_admissible(self) -> int:
        """A full bucket plus what it refilled (limit/60 per second) while the burst ran."""
        return self.plan.limit_rpm + int(self.plan.limit_rpm / 60 * self.burst_seconds)

    def problems(self) -> list[str]:
        found = []
        if self.backends_peak > self.budget:
            found.append(f"{self.backends_peak} PostgreSQL backends, budget {self.budget}")
        slow = [s for s in self.revocation_s if s >= 1.0]
        if len(self.revocation_s) != self.plan.replicas or slow:
            found.append(
                f"revocation applied by {len(self.revocation_s)}/{self.plan.replicas} "
                f"replicas, {len(slow)} of them 1 s or later"
            )
        if self.admitted > self.most_admissible:
            found.append(f"over-admission: {self.admitted} > {self.most_admissible}")
        if self.admitted < self.plan.limit_rpm:
            found.append(f"under-admission: {self.admitted} < {self.plan.limit_rpm}")
        if set(self.burst_statuses) - {200, 429}:
            found.append(f"burst answers other than 200/429: {self.burst_statuses}")
        if self.ledger_requests != self.answered_2xx:
            found.append(f"ledger {self.ledger_requests} requests for {self.answered_2xx} 2xx")
        if self.limited_ledger_requests != self.admitted:
            found.append(f"ledger {self.limited_ledger_requests} for {self.admitted} admitted")
        if self.pool_gave_up:
            found.append(f"{self.pool_gave_up:.0f} calls found the pool exhausted")
        if self.load is None or self.load.non_2xx or self.load.socket_errors:
            found.append(f"valid-key load not all 2xx: {self.load}")
        return found

    def render(self) -> str:
        plan, load = self.plan, self.load
        fmt = "/".join
        revocations = sorted(self.revocation_s) or [float("nan")]
        lines = [
            f"Soak: {plan.replicas} replicas (authz serve) -> PgBouncer (transaction mode) -> "
            f"PostgreSQL, one Redis, one Envoy; {plan.rate} rps for {plan.seconds:g} s; "
            + (" ".join(f"{k}={v}" for k, v in plan.settings.items()) or "default settings"),
            f"load         {self.sent} sent, "
            + (
                f"{load.requests} answered, {load.non_2xx} non-2xx, {load.socket_errors} "
                f"socket errors, {load.rps:.0f} rps, p50 {load.p50_ms:.1f} ms, "
                f"p99 {load.p99_ms:.1f} ms"
                if load
                else "no result"
            ),
            f"PostgreSQL   peak {self.backends_peak} backends over {self.backend_samples} "
            f"samples; budget {self.budget} = {plan.replicas} LISTEN + {SERVER_POOL_SIZE} "
            f"PgBouncer server connections (without PgBouncer: {plan.replicas} x "
            f"({POOL_SIZE} + 1) = {plan.replicas * (POOL_SIZE + 1)}); "
            f"{self.pool_gave_up:.0f} calls gave up waiting for a pool connection",
            f"revocation   applied by {len(self.revocation_s)}/{plan.replicas} replicas, "
            f"median {statistics.median(revocations):.3f} s, slowest {revocations[-1]:.3f} s "
            "after the commit (each replica's own log line)",
            f"shared limit rpm {plan.limit_rpm}: {sum(self.burst_statuses.values())} sent in "
            f"{self.burst_seconds:.2f} s, {self.admitted} admitted, at most "
            f"{self.most_admissible} admissible (limit + refill); answers "
            f"{dict(sorted(self.burst_statuses.items()))}",
            f"ledger       {self.ledger_requests} requests for {self.answered_2xx} 2xx answers "
            f"({self.sent} sent); rate-limited "
            f"workspace {self.limited_ledger_requests} for {self.admitted} admitted",
            f"costs        {self.costs.line() if self.costs else 'not measured'}",
            f"idle         {self.idle.idle_line(plan.replicas) if self.idle else 'not measured'}",
            f"machine      {os.cpu_count()} CPUs, load average before "
            f"{fmt(f'{x:.2f}' for x in self.loadavg[0])}, after "
            f"{fmt(f'{x:.2f}' for x in self.loadavg[1])}",
        ]
        lines.append(f"Envoy        {self.envoy}")
        lines += [f"replica log  {n} x {message}" for message, n in self.warnings.items()]
        problems = self.problems()
        lines.append("RESULT       " + ("pass" if not problems else "FAIL: " + "; ".join(problems)))
        return "\n".join(lines)
