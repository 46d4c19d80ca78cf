"""The ext_authz servers behind each benchmark listener, their keys, and their CPU time.

A setup is what sits behind one Envoy listener: nothing (a), the no-op server (b), or
`authz serve` on a store, as one or more replicas (c, d, e). The sidecar runs with the shipped
defaults except its addresses and a cache TTL longer than the run, so every Check after the
warm-up is a cache hit and the figures are the steady state.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from grpc_health.v1 import health_pb2

from tests.support.procs import ManagedProcess, free_port, free_ports_in_a_row
from tests.support.stack import AUTHZ_SERVICE, authz_cli, health_status, wait_until

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_READY_SECONDS = 60.0
_SERVING = health_pb2.HealthCheckResponse.SERVING
# Far above any per-run count, so no Check is ever denied for rate: every Check still runs
# the full bucket script (0 would mean "unlimited" and skip it).
_HUGE_LIMIT = "2000000000"
BENCH_CACHE_TTL_S = "3600"


@dataclass(frozen=True, slots=True)
class Setup:
    """One listener's backend: `replicas` separate processes, each with AUTHZ_WORKERS=`workers`."""

    name: str
    title: str
    kind: str  # "none", "noop" or "authz"
    store: str = ""  # "sqlite" or "postgres" (authz only)
    replicas: int = 1
    workers: int = 1


SETUPS: tuple[Setup, ...] = (
    Setup("a", "Envoy alone (direct_response)", "none"),
    Setup("b", "no-op grpc.aio+uvloop ext_authz", "noop"),
    Setup("c", "authz serve, embedded (SQLite)", "authz", "sqlite"),
    Setup("d", "authz serve, PostgreSQL + Redis", "authz", "postgres"),
    Setup("e", "authz serve --workers 2, PostgreSQL + Redis", "authz", "postgres", workers=2),
)


def process_tree_cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds of these processes and every live descendant (/proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _read_stat(int(entry.name))
            if stat is not None:
                children.setdefault(int(stat[1]), []).append(int(entry.name))
    total, todo, seen = 0.0, list(pids), set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        stat = _read_stat(pid)
        if stat is not None:
            total += (int(stat[11]) + int(stat[12])) / _CLOCK_TICKS
        todo.extend(children.get(pid, []))
    return total


def _read_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state is [0], ppid [1])."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


@dataclass
class Running:
    """A started setup: its processes, the gRPC ports Envoy should use, the key to send."""

    setup: Setup
    processes: list[ManagedProcess] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    authorization: str | None = None
    database_url: str = ""
    redis_url: str = ""

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def cpu_seconds(self) -> float:
        return process_tree_cpu_seconds(self.pids)

    def stop(self) -> None:
        for process in self.processes:
            process.stop()


def authz_env(
    *, database_url: str, redis_url: str, grpc_port: int, metrics_port: int, workers: int
) -> dict[str, str]:
    """Environment of one `authz serve` process in the benchmark."""
    env = {
        "AUTHZ_DATABASE_URL": database_url,
        "AUTHZ_GRPC_ADDR": f"127.0.0.1:{grpc_port}",
        "AUTHZ_METRICS_ADDR": f"127.0.0.1:{metrics_port}",
        "AUTHZ_CACHE_TTL_S": BENCH_CACHE_TTL_S,
        "AUTHZ_DRAIN_DELAY_S": "0",
    }
    if redis_url:
        env["AUTHZ_REDIS_URL"] = redis_url
    if workers > 1:
        env["AUTHZ_WORKERS"] = str(workers)
    return env


def start_authz(
    log_dir: Path, name: str, env: Mapping[str, str], *, port: int, extra: Sequence[str] = ()
) -> ManagedProcess:
    """`authz serve` (or a wrapper given by `extra`), waited for until its Check is SERVING."""
    command = [sys.executable, *(extra or ["-m", "authz"]), "serve"]
    process = ManagedProcess(command, log_dir=log_dir, name=name, env=env, cwd=log_dir)
    address = f"127.0.0.1:{port}"
    try:
        wait_until(
            lambda: health_status(address, AUTHZ_SERVICE) == _SERVING or not process.is_running(),
            timeout=_READY_SECONDS,
            what=f"{name} ready",
        )
        if not process.is_running():
            raise RuntimeError(f"{name} exited:\n{process.read_log()[-3000:]}")
    except BaseException:
        process.stop()
        raise
    return process


def seed_key(database_url: str, label: str) -> str:
    """A workspace with limits no run reaches, and one key in it; returns the bearer header."""
    if database_url.startswith("postgres"):
        authz_cli(database_url, "migrate")
    workspace = authz_cli(
        database_url, "workspace", "create", f"bench-{label}", "--rpm", _HUGE_LIMIT,
        "--tpm", _HUGE_LIMIT,
    )  # fmt: skip
    key = authz_cli(database_url, "key", "create", "--workspace", workspace["id"], "--label", label)
    return f"Bearer {key['secret']}"


def start_setup(
    setup: Setup, log_dir: Path, *, postgres_url: str, redis_url: str, seeded: dict[str, str]
) -> Running:
    """Start `setup`'s processes; `seeded` maps database URLs to keys already made in them."""
    running = Running(setup)
    try:
        if setup.kind == "noop":
            port = free_port()
            command = [sys.executable, "-m", "bench.noop_authz", "--addr", f"127.0.0.1:{port}"]
            process = ManagedProcess(command, log_dir=log_dir, name="noop")
            running.processes.append(process)
            process.wait_for_port(port, timeout=_READY_SECONDS)
            running.ports.append(port)
        elif setup.kind == "authz":
            if setup.store == "sqlite":
                running.database_url = f"sqlite:///{log_dir / 'bench.db'}"
            else:
                running.database_url, running.redis_url = postgres_url, redis_url
            if running.database_url not in seeded:
                seeded[running.database_url] = seed_key(running.database_url, setup.name)
            running.authorization = seeded[running.database_url]
            for replica in range(setup.replicas):
                port = free_port()
                env = authz_env(
                    database_url=running.database_url,
                    redis_url=running.redis_url,
                    grpc_port=port,
                    metrics_port=free_ports_in_a_row(setup.workers),
                    workers=setup.workers,
                )
                name = f"sidecar-{setup.name}{replica}"
                running.processes.append(start_authz(log_dir, name, env, port=port))
                running.ports.append(port)
    except BaseException:
        running.stop()
        raise
    return running
