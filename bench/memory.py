"""`make bench-memory`: the sidecar's RSS per 100,000 cached keys, on PostgreSQL + Redis.

N keys on W workspaces are created through the store, then each key is checked once over
gRPC (straight to the sidecar: Envoy adds nothing to the sidecar's memory), with a cache TTL
longer than the run, so every key and workspace ends up cached. RSS is read from
/proc/<pid>/status before and after. With --tracemalloc the sidecar runs under
bench.memprobe, and the growth is broken down by source line and by object type.

    python -m bench.envoy_bench --memory [--keys 100000] [--workspaces 1000] [--tracemalloc]
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path

import grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc

from authz.keys import mint_key
from authz.models import CLI_ACTOR, NewWorkspace
from authz.settings import load_settings
from authz.store import open_store
from authz.store.base import StoreUnavailable
from bench.backends import bench_database, postgres_base_dsn, redis_url
from bench.loadgen import REQUEST_BODY
from bench.memprobe import SNAPSHOT_DIR_ENV
from bench.setups import authz_env, start_authz
from tests.support.checks import bearer, check_request
from tests.support.procs import free_port, wait_for_port
from tests.support.stack import authz_cli, wait_until

_CONCURRENCY = 16
_LIMIT = 2_000_000_000
_TOP = 15
_SEED_WRITERS = 4
_SEED_ATTEMPTS = 5


async def _seed(dsn: str, *, keys: int, workspaces: int) -> list[str]:
    """Create the workspaces and keys through the store; returns the secrets."""
    settings = load_settings({"AUTHZ_DATABASE_URL": dsn})
    store = await open_store(dsn, **settings.store_options(request_path=False))
    try:
        made = [
            await store.create_workspace(
                NewWorkspace(name=f"mem-{i}", rpm=_LIMIT, tpm=_LIMIT, key_limit=keys),
                actor=CLI_ACTOR,
            )
            for i in range(workspaces)
        ]
        secrets: list[str] = []
        pending = iter(range(keys))

        async def worker() -> None:
            for index in pending:
                secret, new = mint_key(made[index % workspaces].id, f"k{index}")
                for attempt in range(_SEED_ATTEMPTS):  # a busy machine can miss a timeout
                    try:
                        await store.create_key(new, actor=CLI_ACTOR)
                        break
                    except StoreUnavailable:
                        if attempt == _SEED_ATTEMPTS - 1:
                            raise
                secrets.append(secret)

        await asyncio.gather(*(worker() for _ in range(_SEED_WRITERS)))
        return secrets
    finally:
        await store.close()


async def _check_all(address: str, secrets: Sequence[str]) -> dict[str, int]:
    """One Check per secret, _CONCURRENCY at a time; returns outcome counts."""
    outcomes: dict[str, int] = {}
    body = REQUEST_BODY.encode()
    pending = iter(secrets)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)

        async def worker() -> None:
            for secret in pending:
                request = check_request(headers=bearer(secret), body=body)
                try:
                    answer = await stub.Check(request, timeout=5)
                    outcome = "allowed" if answer.status.code == 0 else "denied"
                except grpc.aio.AioRpcError as error:
                    outcome = error.code().name
                outcomes[outcome] = outcomes.get(outcome, 0) + 1

        await asyncio.gather(*(worker() for _ in range(_CONCURRENCY)))
    return outcomes


def rss_bytes(pid: int) -> int:
    """VmRSS of a process, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def _snapshot(pid: int, folder: Path, number: int) -> tracemalloc.Snapshot:
    os.kill(pid, signal.SIGUSR1)
    path = folder / f"snapshot-{number}.pickle"
    wait_until(path.exists, timeout=120, what=f"snapshot {number}", interval=0.2)
    return tracemalloc.Snapshot.load(str(path))


def _breakdown(
    folder: Path, before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, keys: int
) -> list[str]:
    lines = ["", "tracemalloc growth by source line (bytes per key, objects per key):"]
    diffs = after.compare_to(before, "lineno")
    for stat in diffs[:_TOP]:
        frame = stat.traceback[0]
        lines.append(
            f"  {stat.size_diff / keys:8.1f} B/key  {stat.count_diff / keys:6.2f} obj/key  "
            f"{frame.filename}:{frame.lineno}"
        )
    traced = sum(s.size_diff for s in diffs)
    lines.append(f"  total traced growth: {traced / keys:.1f} B/key")
    types_before = json.loads((folder / "types-1.json").read_text())
    types_after = json.loads((folder / "types-2.json").read_text())
    grown = []
    for type_name, (count, size) in types_after.items():
        old_count, old_size = types_before.get(type_name, [0, 0])
        grown.append((count - old_count, size - old_size, type_name))
    grown.sort(key=lambda row: -row[1])
    lines.append("gc-tracked objects by type (objects per key, shallow bytes per key):")
    lines += [
        f"  {n / keys:6.2f} obj/key  {b / keys:8.1f} B/key  {name}" for n, b, name in grown[:_TOP]
    ]
    return lines


def run_memory(*, keys: int, workspaces: int, trace: bool) -> int:
    """Load `keys` cached keys into one sidecar and print its RSS growth per 100k keys."""
    with (
        tempfile.TemporaryDirectory(prefix="authz-bench-mem-") as name,
        postgres_base_dsn() as base,
        bench_database(base) as dsn,
        redis_url() as redis,
    ):
        folder = Path(name)
        authz_cli(dsn, "migrate")
        started = time.monotonic()
        secrets = asyncio.run(_seed(dsn, keys=keys, workspaces=workspaces))
        print(
            f"created {keys} keys on {workspaces} workspaces in {time.monotonic() - started:.0f} s"
        )
        port = free_port()
        env = authz_env(database_url=dsn, redis_url=redis, grpc_port=port,
                        metrics_port=free_port(), workers=1)  # fmt: skip
        env[SNAPSHOT_DIR_ENV] = str(folder)
        env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
        extra = ["-m", "bench.memprobe"] if trace else []
        process = start_authz(folder, "sidecar-mem", env, port=port, extra=extra)
        try:
            wait_for_port("127.0.0.1", port, timeout=10)
            address = f"127.0.0.1:{port}"
            asyncio.run(_check_all(address, secrets[:_CONCURRENCY]))  # pools, scripts, imports
            rss_before = rss_bytes(process.pid)
            first = _snapshot(process.pid, folder, 1) if trace else None
            started = time.monotonic()
            outcomes = asyncio.run(_check_all(address, secrets))
            took = time.monotonic() - started
            rss_after = rss_bytes(process.pid)
            second = _snapshot(process.pid, folder, 2) if trace else None
        finally:
            process.stop()
        cached = outcomes.get("allowed", 0)  # an UNAVAILABLE answer caches nothing
        details = _breakdown(folder, first, second, max(cached, 1)) if first and second else []
    growth = rss_after - rss_before
    lines = [
        f"checked {len(secrets)} keys in {took:.0f} s: {outcomes}"
        + (" (under tracemalloc: slower, and RSS includes its own bookkeeping)" if trace else ""),
        f"sidecar RSS: {rss_before / 2**20:.0f} MB after start-up, "
        f"{rss_after / 2**20:.0f} MB after checking {keys} keys",
        f"growth: {growth / 2**20:.0f} MB for {cached} cached keys: "
        f"{growth / max(cached, 1):.0f} B per key, "
        f"{growth / max(cached, 1) * 100_000 / 2**20:.0f} MB per 100k keys",
    ]
    print("\n".join(lines + details))
    return 0 if cached == keys else 1
