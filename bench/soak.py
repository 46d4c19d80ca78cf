"""`make soak`: many sidecars on one PostgreSQL (through PgBouncer) and one Redis, behind one
Envoy, under steady load: a large fleet's shape, shrunk onto this machine.

N `authz serve` processes (20 by default) pool through PgBouncer in transaction mode (statement
cache off) and LISTEN on a direct connection, as docs/deploy.md configures them. One Envoy,
built from the shipped envoy.yaml (bench.envoy_config), spreads Checks and access logs over
them; bench.openloop sends a fixed rate with one valid key. Meanwhile the harness:

- samples `pg_stat_activity` for the database's backends, against the budget (one LISTEN
  session per process plus PgBouncer's server pool; its own sessions are left out by name);
- revokes a key every replica has cached, and reads in each replica's own log when it applied
  the change (its timestamp against the commit's: no race between the harness's processes);
- bursts requests at a workspace with an RPM limit and counts the 200s against the most its
  bucket can admit (the limit, plus the refill over the burst's duration);
- compares the ledger (`authz usage`) with the requests sent and the 200s admitted.

    python -m bench.soak [--replicas 20] [--seconds 60] [--rate 200]

tests/e2e/test_soak.py runs a short version of it in `make test`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from bench.backends import (
    TRANSACTIONS,
    StatementCounter,
    bench_database,
    postgres_base_dsn,
    redis_commands,
)
from bench.backends import redis_url as redis_url_for_bench
from bench.envoy_bench import start_bench_envoy
from bench.loadgen import PATH, REQUEST_BODY, run_openloop
from bench.setups import Running, Setup, authz_env, start_authz
from bench.soak_result import POOL_SIZE, Costs, SoakPlan, SoakResult
from tests.support.pgbouncer import find_pgbouncer, pgbouncer_for, through
from tests.support.procs import free_port
from tests.support.stack import FEED_LOGS, Sidecar, authz_cli, change_applied_after, wait_until

ADMIN = "soak-admin"
"""application_name of the harness's own sessions (CLI, sampler), left out of the count."""
_STARTING_AT_ONCE = 5  # sidecars importing in parallel on a 2-core machine
_BURST_THREADS = 16
_SAMPLE_SECONDS = 0.2
_IDLE_SECONDS = 5.0
_SETTLE_SECONDS = 60.0  # ceiling for the ledger to catch up and changes to show
# Envoy's counters that explain a non-2xx or a short ledger: ext_authz outcomes, and access
# log entries the gRPC stream dropped under back-pressure.
_ENVOY_STATS = ("http.soak.ext_authz.", "access_logs.grpc_access_log.")
_HUGE = 2_000_000_000  # a limit no run reaches, so every Check still runs the bucket script


class BackendSampler:
    """Counts the soak database's PostgreSQL backends every 0.2 s, in a thread of its own."""

    _QUERY = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 "
        "AND application_name <> $2 AND pid <> pg_backend_pid()"
    )

    def __init__(self, server_dsn: str, database: str) -> None:
        self._dsn = server_dsn
        self._database = database
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self.peak = 0
        self.samples = 0

    async def _run(self) -> None:
        conn = await asyncpg.connect(
            self._dsn, timeout=10, server_settings={"application_name": ADMIN}
        )
        try:
            while not self._stop.is_set():
                count = int(await conn.fetchval(self._QUERY, self._database, ADMIN))
                self.peak, self.samples = max(self.peak, count), self.samples + 1
                await asyncio.sleep(_SAMPLE_SECONDS)
        finally:
            await conn.close()

    def __enter__(self) -> BackendSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@dataclass(frozen=True, slots=True)
class Tenant:
    workspace_id: str
    key_id: str
    secret: str

    @property
    def authorization(self) -> str:
        return f"Bearer {self.secret}"


def _tenant(admin_url: str, name: str, *, rpm: int) -> Tenant:
    workspace = authz_cli(admin_url, "workspace", "create", name, "--rpm", str(rpm), "--tpm", "0")
    key = authz_cli(admin_url, "key", "create", "--workspace", workspace["id"], "--label", name)
    return Tenant(workspace["id"], key["id"], key["secret"])


def _settled(read: Callable[[], int], expected: int) -> int:
    """`read()` once it equals `expected`, or its last value at the ceiling."""
    deadline = time.monotonic() + _SETTLE_SECONDS
    while (value := read()) != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    return value


def _post(url: str, authorization: str) -> int:
    request = urllib.request.Request(  # noqa: S310 - the harness's own http:// URL
        url,
        data=REQUEST_BODY.encode(),
        headers={"Authorization": authorization, "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310
            answer.read()
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return error.code


def _burst(url: str, tenant: Tenant, count: int, result: SoakResult) -> None:
    started = time.monotonic()
    with ThreadPoolExecutor(_BURST_THREADS) as pool:
        statuses = list(pool.map(lambda _: _post(url, tenant.authorization), range(count)))
    result.burst_seconds = time.monotonic() - started
    result.burst_statuses = dict(Counter(statuses))


def _revoke_everywhere(admin_url: str, tenant: Tenant, sidecars: Sequence[Sidecar]) -> list[float]:
    """Revoke a key every replica has cached; seconds from the commit to each one applying it."""
    revoked = authz_cli(admin_url, "key", "revoke", tenant.key_id)
    for sidecar in sidecars:
        wait_until(
            lambda s=sidecar: s.decide(tenant.secret) == 401,
            timeout=_SETTLE_SECONDS,
            what=f"{sidecar.grpc_addr} refuses the revoked key",
        )
    return [change_applied_after(s, "key", revoked["revoked_at"]) for s in sidecars]


@contextmanager
def _replicas(
    plan: SoakPlan, log_dir: Path, *, pooled: str, direct: str, redis_url: str
) -> Iterator[tuple[Running, list[Sidecar]]]:
    """The plan's sidecars as docs/deploy.md configures them behind PgBouncer, all ready."""
    count = plan.replicas
    running = Running(Setup("soak", f"{count} replicas", "authz", "postgres", replicas=count))

    # Every port chosen up front; free_port() reserves each one, so no two are the same.
    addresses = [(free_port(), free_port()) for _ in range(count)]

    def start(index: int) -> Sidecar:
        port, metrics_port = addresses[index]
        env = authz_env(
            database_url=pooled, redis_url=redis_url, grpc_port=port, metrics_port=metrics_port,
            workers=1,
        )  # fmt: skip
        env |= {
            "AUTHZ_DATABASE_LISTEN_URL": direct,
            "AUTHZ_DATABASE_STATEMENT_CACHE": "false",
            "AUTHZ_DB_POOL_SIZE": str(POOL_SIZE),
            **FEED_LOGS,
            **plan.settings,
        }
        process = start_authz(log_dir, f"replica-{index:02d}", env, port=port)
        return Sidecar(process, f"127.0.0.1:{port}", f"127.0.0.1:{metrics_port}")

    sidecars: list[Sidecar] = []
    try:
        with ThreadPoolExecutor(_STARTING_AT_ONCE) as pool:
            for sidecar in pool.map(start, range(count)):
                sidecars.append(sidecar)
                running.processes.append(sidecar.process)
                running.ports.append(int(sidecar.grpc_addr.rpartition(":")[2]))
        yield running, sidecars
    finally:
        with ThreadPoolExecutor(_STARTING_AT_ONCE) as pool:
            list(pool.map(lambda p: p.stop(), running.processes))


@dataclass(frozen=True, slots=True)
class _Meter:
    """Reads the counters whose growth over the load window makes `Costs`."""

    running: Running
    redis_url: str
    statements: StatementCounter

    def read(self) -> tuple[float, float, int, int, int]:
        redis = sum(redis_commands(self.redis_url).values())
        transactions = StatementCounter(self.statements.dsn, TRANSACTIONS).read()
        statements = self.statements.read()
        return time.monotonic(), self.running.cpu_seconds(), redis, statements, transactions

    def since(self, before: tuple[float, float, int, int, int], requests: int) -> Costs:
        now = self.read()
        return Costs(
            requests=requests,
            seconds=now[0] - before[0],
            sidecar_cpu_s=now[1] - before[1],
            redis_commands=now[2] - before[2],
            pg_statements=now[3] - before[3],
            pg_method=self.statements.method,
            pg_transactions=now[4] - before[4],
        )


def run_soak(plan: SoakPlan, log_dir: Path, *, base_dsn: str, redis_url: str) -> SoakResult:
    """Run the soak against a PostgreSQL server (a fresh database on it) and a Redis."""
    binary = find_pgbouncer()
    if binary is None:
        raise RuntimeError("pgbouncer is not installed (Debian: apt-get install -y pgbouncer)")
    result = SoakResult(plan)
    before = os.getloadavg()
    with bench_database(base_dsn) as direct, pgbouncer_for(base_dsn, binary) as bouncer:
        admin = f"{direct}?application_name={ADMIN}"
        authz_cli(admin, "migrate")
        tenants = {
            name: _tenant(admin, f"soak-{name}", rpm=rpm)
            for name, rpm in (("steady", _HUGE), ("limited", plan.limit_rpm), ("revoked", _HUGE))
        }
        pooled = through(bouncer, direct)
        with _replicas(plan, log_dir, pooled=pooled, direct=direct, redis_url=redis_url) as (
            running,
            sidecars,
        ):
            for sidecar in sidecars:  # every replica has both keys cached
                answers = {sidecar.decide(tenants[n].secret) for n in ("steady", "revoked")}
                if answers != {200}:
                    raise RuntimeError(f"{sidecar.grpc_addr} does not authorize the soak keys")
            admin_port = free_port()
            envoy, ports = start_bench_envoy(log_dir, {"soak": running}, admin_port=admin_port)
            try:
                url = f"http://127.0.0.1:{ports['soak']}{PATH}"
                wait_until(lambda: _post(url, "") == 401, timeout=60, what="Envoy routes")
                meter = _Meter(running, redis_url, StatementCounter.for_database(admin))
                counters = meter.read()
                time.sleep(_IDLE_SECONDS)  # what the fleet costs with no traffic
                result.idle = meter.since(counters, 0)
                database = urlsplit(direct).path.lstrip("/")
                with BackendSampler(base_dsn, database) as sampler:
                    _steady_load(url, plan, result, admin=admin, tenants=tenants,
                                 sidecars=sidecars, meter=meter)  # fmt: skip
                result.backends_peak, result.backend_samples = sampler.peak, sampler.samples
                result.envoy = _envoy_counters(admin_port)
                result.warnings = _warnings(sidecars)
                result.pool_gave_up = sum(
                    s.metric("authz_db_pool_waits_total", result="gave_up") for s in sidecars
                )
                result.ledger_requests = _settled(
                    lambda: _ledger(admin, tenants["steady"]), result.sent
                )
                result.limited_ledger_requests = _settled(
                    lambda: _ledger(admin, tenants["limited"]), result.admitted
                )
            finally:
                envoy.stop()
    result.loadavg = (before, os.getloadavg())
    return result


def _steady_load(
    url: str,
    plan: SoakPlan,
    result: SoakResult,
    *,
    admin: str,
    tenants: dict[str, Tenant],
    sidecars: Sequence[Sidecar],
    meter: _Meter,
) -> None:
    """The valid-key load for the whole run; a revocation a third of the way in, and the
    rate-limited burst at half way."""
    counters = meter.read()
    with ThreadPoolExecutor(1) as background:
        load = background.submit(
            run_openloop, url, authorization=tenants["steady"].authorization,
            rate=plan.rate, connections=plan.connections, seconds=plan.seconds,
        )  # fmt: skip
        started = time.monotonic()
        time.sleep(plan.seconds / 3)
        result.revocation_s = _revoke_everywhere(admin, tenants["revoked"], sidecars)
        time.sleep(max(0.0, started + plan.seconds / 2 - time.monotonic()))
        _burst(url, tenants["limited"], plan.burst, result)
        result.load = load.result()
    result.sent = int(plan.rate * plan.seconds)
    result.costs = meter.since(counters, result.sent + plan.burst)


def _envoy_counters(admin_port: int) -> dict[str, int]:
    """Envoy's non-zero ext_authz and access-log counters, from its admin /stats."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/stats", timeout=10) as answer:
        text = answer.read().decode()
    counters = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if name.startswith(_ENVOY_STATS) and value.isdigit() and int(value):
            counters[name] = int(value)
    return counters


def _warnings(sidecars: Sequence[Sidecar]) -> dict[str, int]:
    """Warning and error lines of every replica's JSON log, by message (cut to 160 chars)."""
    found: Counter[str] = Counter()
    for sidecar in sidecars:
        for line in sidecar.process.read_log().splitlines():
            entry = json.loads(line) if line.startswith("{") else {}
            if entry.get("level") in ("warning", "error"):
                found[str(entry.get("message"))[:160]] += 1
    return dict(found.most_common(10))


def _ledger(admin_url: str, tenant: Tenant) -> int:
    report: dict[str, Any] = authz_cli(admin_url, "usage", "--workspace", tenant.workspace_id)
    return int(report["requests"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = SoakPlan()
    parser.add_argument("--replicas", type=int, default=defaults.replicas)
    parser.add_argument("--seconds", type=float, default=defaults.seconds)
    parser.add_argument("--rate", type=int, default=defaults.rate)
    args = parser.parse_args(argv)
    plan = SoakPlan(replicas=args.replicas, seconds=args.seconds, rate=args.rate)
    with (
        tempfile.TemporaryDirectory(prefix="authz-soak-") as folder,
        postgres_base_dsn() as base,
        redis_url_for_bench() as redis_url,
    ):
        result = run_soak(plan, Path(folder), base_dsn=base, redis_url=redis_url)
    print(result.render())
    return 1 if result.problems() else 0


if __name__ == "__main__":
    raise SystemExit(main())
