"""AUTHZ_WORKERS: two processes behind one gRPC port, on PostgreSQL and one shared Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc
from google.rpc import code_pb2

from tests.support.checks import bearer, check_request
from tests.support.procs import free_ports_in_a_row
from tests.support.redis_servers import redis_url_for_tests
from tests.support.stack import (
    FEED_LOGS,
    Sidecar,
    authz_cli,
    change_applied_after,
    start_sidecar,
    wait_until,
)

pytestmark = pytest.mark.e2e

WORKERS = 2


class Workers:
    def __init__(self, sidecar: Sidecar, metrics_port: int, dsn: str) -> None:
        self.sidecar = sidecar
        self.dsn = dsn
        host = sidecar.metrics_addr.rpartition(":")[0]
        self.each = [
            Sidecar(sidecar.process, sidecar.grpc_addr, f"{host}:{metrics_port + i}")
            for i in range(WORKERS)
        ]

    def checks_by_worker(self, decision: str) -> list[float]:
        return [w.metric("authz_checks_total", decision=decision) for w in self.each]

    def check(self, secret: str) -> int:
        """One Check on a new connection, which the kernel hands to either worker."""
        with grpc.insecure_channel(self.sidecar.grpc_addr) as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            answer = stub.Check(check_request(headers=bearer(secret)), timeout=10)
            return int(answer.status.code)


@pytest.fixture
def workers(pg_dsn: str, tmp_path: Path) -> Iterator[Workers]:
    authz_cli(pg_dsn, "migrate")
    metrics_port = free_ports_in_a_row(WORKERS)
    with redis_url_for_tests() as redis:
        sidecar = start_sidecar(
            tmp_path,
            database_url=pg_dsn,
            metrics_addr=f"127.0.0.1:{metrics_port}",
            env={"AUTHZ_REDIS_URL": redis, "AUTHZ_WORKERS": str(WORKERS), **FEED_LOGS},
        )
        try:
            each = Workers(sidecar, metrics_port, pg_dsn)
            wait_until(
                lambda: all(_ready(w) for w in each.each),
                timeout=20,
                what="both workers ready",
            )
            yield each
        finally:
            sidecar.process.stop()


def _ready(worker: Sidecar) -> bool:
    try:
        return worker.metric("authz_ready", component="store") == 1
    except OSError:  # its metrics port is not open yet
        return False


def _key(dsn: str, *, rpm: int) -> dict[str, str]:
    workspace = authz_cli(
        dsn, "workspace", "create", f"ws-{time.monotonic_ns()}", "--rpm", str(rpm)
    )
    key: dict[str, str] = authz_cli(
        dsn, "key", "create", "--workspace", workspace["id"], "--label", "w"
    )
    return key


def test_two_workers_share_one_redis_bucket_exactly(workers: Workers) -> None:
    rpm = 20
    key = _key(workers.dsn, rpm=rpm)
    codes = [workers.check(key["secret"]) for _ in range(2 * rpm)]
    assert codes.count(code_pb2.OK) == rpm
    assert codes.count(code_pb2.PERMISSION_DENIED) == rpm
    # Both workers answered some of them (40 new connections all on one: odds 2**-39).
    answered = zip(workers.checks_by_worker("allow"), workers.checks_by_worker("deny"), strict=True)
    assert all(allowed + denied > 0 for allowed, denied in answered)


def test_revocation_reaches_both_workers_within_one_second(workers: Workers) -> None:
    key = _key(workers.dsn, rpm=10_000)
    wait_until(
        lambda: (
            workers.check(key["secret"]) == code_pb2.OK
            and all(n > 0 for n in workers.checks_by_worker("allow"))
        ),
        timeout=20,
        what="the key cached by both workers",
    )
    before = [w.metric("authz_cache_invalidations_total", kind="key") for w in workers.each]
    done = authz_cli(workers.dsn, "key", "revoke", key["id"])
    wait_until(
        lambda: all(
            w.metric("authz_cache_invalidations_total", kind="key") > b
            for w, b in zip(workers.each, before, strict=True)
        ),
        timeout=10,
        what="the revocation at both workers",
    )
    # From the commit to each worker applying it, by that worker's own log line (its pid):
    # within 1 s, as for one process, whatever the scheduling of the test's processes.
    pids = _workers_of(workers.sidecar.process.pid)
    assert len(pids) == WORKERS
    took = {
        pid: change_applied_after(workers.sidecar, "key", done["revoked_at"], pid=pid)
        for pid in pids
    }
    assert all(seconds < 1.0 for seconds in took.values()), took
    denied_before = workers.checks_by_worker("deny")
    codes = {workers.check(key["secret"]) for _ in range(20)}
    assert codes == {code_pb2.UNAUTHENTICATED}
    assert all(
        after > b for after, b in zip(workers.checks_by_worker("deny"), denied_before, strict=True)
    )


def _workers_of(pid: int) -> list[int]:
    """The supervisor's worker processes (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [
        int(child)
        for child in children
        if b"resource_tracker" not in Path(f"/proc/{child}/cmdline").read_bytes()
    ]


def test_sigterm_drains_and_ends_both_workers(workers: Workers) -> None:
    process = workers.sidecar.process
    children = _workers_of(process.pid)
    assert len(children) == WORKERS
    process.send_signal(signal.SIGTERM)  # the supervisor only, as an orchestrator would
    assert process.wait(timeout=30) == 0
    assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]
    assert process.read_log().count("stopped") >= WORKERS


def test_signals_repeated_while_draining_still_end_both_workers(workers: Workers) -> None:
    """A second Ctrl-C, or a manager that repeats SIGTERM: the supervisor's handler only
    records the signal (forwarding takes each worker's Event lock, which a handler interrupting
    the supervisor mid-forward must not take), so more signals change nothing."""
    process = workers.sidecar.process
    children = _workers_of(process.pid)
    for i in range(40):
        process.send_signal(signal.SIGTERM if i % 2 == 0 else signal.SIGINT)
        time.sleep(0.005)
    assert process.wait(timeout=30) == 0
    assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]
    assert process.read_log().count("stopped") >= WORKERS


def test_embedded_refuses_more_than_one_worker(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "authz", "serve", "--workers", "2"],
        env={"AUTHZ_DATABASE_URL": f"sqlite:///{tmp_path / 'authz.db'}", "PATH": "/usr/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "AUTHZ_WORKERS" in lines[0]
    assert "AUTHZ_REDIS_URL" in lines[0]


def test_a_worker_that_dies_stops_the_other_and_the_pod_fails(workers: Workers) -> None:
    """An orchestrator must see one failure, not a pod quietly serving on fewer workers."""
    process = workers.sidecar.process
    children = _workers_of(process.pid)
    assert len(children) == WORKERS
    os.kill(children[0], signal.SIGKILL)
    assert process.wait(timeout=60) == 128 + signal.SIGKILL
    assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]
    log_text = process.read_log()
    assert "exited (code 137): stopping the others" in log_text
    assert log_text.count("stopped") == WORKERS - 1  # the survivor drained
