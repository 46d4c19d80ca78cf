"""Health, graceful shutdown, PostgreSQL replicas and PostgreSQL outages, with real processes."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

from tests.support.postgres_server import PostgresServer, start_postgres_server
from tests.support.procs import free_port
from tests.support.stack import (
    AUTHZ_SERVICE,
    FEED_LOGS,
    authz_cli,
    change_applied_after,
    health_status,
    start_envoy,
    start_sidecar,
    start_upstream,
    wait_until,
)

pytestmark = pytest.mark.e2e
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def workspace_and_key(database_url: str) -> tuple[str, dict[str, str]]:
    workspace = authz_cli(database_url, "workspace", "create", f"ws-{time.monotonic_ns()}")
    key = authz_cli(database_url, "key", "create", "--workspace", workspace["id"], "--label", "t")
    return workspace["id"], key


def test_health_then_sigterm_not_serving_drain_exit_zero(tmp_path: Path) -> None:
    sidecar = start_sidecar(
        tmp_path, database_url=f"sqlite:///{tmp_path / 'a.db'}", env={"AUTHZ_DRAIN_DELAY_S": "5"}
    )
    try:
        assert health_status(sidecar.grpc_addr, "") == SERVING
        assert health_status(sidecar.grpc_addr, AUTHZ_SERVICE) == SERVING
        sidecar.process.send_signal(signal.SIGTERM)
        wait_until(
            lambda: health_status(sidecar.grpc_addr, AUTHZ_SERVICE) == NOT_SERVING,
            timeout=5,
            what="NOT_SERVING during drain",
        )
        assert sidecar.process.wait(timeout=10) == 0
        assert "stopped" in sidecar.process.read_log()
    finally:
        sidecar.process.stop()


def test_sigterm_is_not_held_by_envoys_open_access_log_stream(tmp_path: Path, pg_dsn: str) -> None:
    authz_cli(pg_dsn, "migrate")
    _, key = workspace_and_key(pg_dsn)
    upstream, upstream_port = start_upstream(tmp_path)
    # A grace period no test would wait out: the exit below proves nothing waited for it.
    sidecar = start_sidecar(tmp_path, database_url=pg_dsn, env={"AUTHZ_SHUTDOWN_GRACE_S": "600"})
    envoy, port = start_envoy(
        tmp_path, authz_port=int(sidecar.grpc_addr.rsplit(":", 1)[1]), upstream_port=upstream_port
    )
    try:
        from tests.support.stack import Stack

        stack = Stack(envoy, upstream, sidecar, pg_dsn, port, upstream_port)
        auth = {"Authorization": f"Bearer {key['secret']}"}
        wait_until(
            lambda: stack.request("/v1/models", headers=auth).status == 200,
            timeout=20,
            what="routes",
        )
        wait_until(
            lambda: "authz_usage_reconciliations_total{" in sidecar.metrics(),
            timeout=20,
            what="Envoy's access-log stream delivering",
        )
        sidecar.process.send_signal(signal.SIGTERM)
        assert sidecar.process.wait(timeout=60) == 0
        assert "stopped" in sidecar.process.read_log()
    finally:
        envoy.stop()
        sidecar.process.stop()
        upstream.stop()


def test_bad_setting_stops_startup_with_one_line_exit_2(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "authz", "serve"],
        env={"AUTHZ_FAILURE_MODE": "sometimes", "PATH": "/usr/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "authz: invalid setting AUTHZ_FAILURE_MODE: expected one of closed, open (got 'sometimes')"
    ]


def serve_once(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`authz serve` run to its exit, JSON logs; the ceiling is only against a hang."""
    return subprocess.run(
        [sys.executable, "-m", "authz", "serve"],
        env={
            "PATH": "/usr/bin",
            "AUTHZ_DATABASE_URL": f"sqlite:///{tmp_path / 'a.db'}",
            "AUTHZ_LOG_FORMAT": "json",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )


def bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.mark.parametrize("taken", ["AUTHZ_GRPC_ADDR", "AUTHZ_METRICS_ADDR"])
def test_taken_port_exits_1_with_one_json_line_and_nothing_bound(
    tmp_path: Path, taken: str
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        ports = {
            "AUTHZ_GRPC_ADDR": free_port(),
            "AUTHZ_METRICS_ADDR": free_port(),
            taken: squatter.getsockname()[1],
        }
        done = serve_once(tmp_path, {name: f"127.0.0.1:{port}" for name, port in ports.items()})
        entries = [json.loads(line) for line in done.stderr.splitlines()]
        assert done.returncode == 1
        errors = [e["message"] for e in entries if e["level"] == "error"]
        assert len(errors) == 1
        assert errors[0].startswith(f"cannot start: cannot listen on {taken}=127.0.0.1:")
        assert "\n" not in errors[0]
        assert not any(e["message"] == "stopped" for e in entries)
    # The process is gone (above), so this only proves it did not hand its sockets on.
    assert all(bindable(port) for port in ports.values())


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """Fault tests always get their own server."""
    server = start_postgres_server()
    try:
        yield server
    finally:
        server.close()


def test_revocation_reaches_two_replicas_within_one_second(tmp_path: Path, pg_dsn: str) -> None:
    authz_cli(pg_dsn, "migrate")
    _, key = workspace_and_key(pg_dsn)
    replicas = [
        start_sidecar(tmp_path, database_url=pg_dsn, name=f"replica{i}", env=FEED_LOGS)
        for i in range(2)
    ]
    try:
        assert [r.decide(key["secret"]) for r in replicas] == [200, 200]
        revoked = authz_cli(pg_dsn, "key", "revoke", key["id"])
        for replica in replicas:
            wait_until(lambda r=replica: r.decide(key["secret"]) == 401, timeout=10, what="revoke")
        assert [change_applied_after(r, "key", revoked["revoked_at"]) < 1.0 for r in replicas] == [
            True,
            True,
        ]
    finally:
        for replica in replicas:
            replica.process.stop()


def test_postgres_outage_cached_keys_work_uncached_get_503(
    tmp_path: Path, own_postgres: PostgresServer
) -> None:
    dsn = own_postgres.dsn
    authz_cli(dsn, "migrate")
    _, cached = workspace_and_key(dsn)
    _, uncached = workspace_and_key(dsn)
    upstream, upstream_port = start_upstream(tmp_path)
    sidecar = start_sidecar(tmp_path, database_url=dsn, env=FEED_LOGS)
    envoy, port = start_envoy(
        tmp_path, authz_port=int(sidecar.grpc_addr.rsplit(":", 1)[1]), upstream_port=upstream_port
    )
    try:
        from tests.support.stack import Stack

        stack = Stack(envoy, upstream, sidecar, dsn, port, upstream_port)
        wait_until(lambda: stack.request("/v1/models").status == 401, timeout=20, what="routes")
        auth = {"Authorization": f"Bearer {cached['secret']}"}
        assert stack.request("/v1/models", headers=auth).status == 200

        own_postgres.kill()
        wait_until(lambda: not sidecar.ready(), timeout=20, what="readiness drops")
        assert stack.request("/v1/models", headers=auth).status == 200
        missing = stack.request(
            "/v1/models", headers={"Authorization": f"Bearer {uncached['secret']}"}
        )
        assert missing.status == 503

        own_postgres.start()
        wait_until(sidecar.ready, timeout=20, what="readiness returns")
        answer = stack.request(
            "/v1/models", headers={"Authorization": f"Bearer {uncached['secret']}"}
        )
        assert answer.status == 200
        assert 'authz_store_errors_total{operation="lookup_key"}' in sidecar.metrics()

        # The change feed re-LISTENs after the outage (dropping the cache, as NOTIFY has no
        # replay), so a revocation made now still reaches this replica within a second.
        wait_until(
            lambda: 'authz_cache_invalidations_total{kind="reset"} 2.0' in sidecar.metrics(),
            timeout=10,
            what="change feed reconnected",
        )
        assert stack.request("/v1/models", headers=auth).status == 200
        revoked = authz_cli(dsn, "key", "revoke", cached["id"])
        wait_until(
            lambda: stack.request("/v1/models", headers=auth).status == 401,
            timeout=10,
            what="revocation after reconnect",
        )
        assert change_applied_after(sidecar, "key", revoked["revoked_at"]) < 1.0
    finally:
        envoy.stop()
        sidecar.process.stop()
        upstream.stop()


def test_json_logs_are_one_object_per_line(tmp_path: Path) -> None:
    sidecar = start_sidecar(
        tmp_path, database_url=f"sqlite:///{tmp_path / 'a.db'}", env={"AUTHZ_LOG_FORMAT": "json"}
    )
    sidecar.process.send_signal(signal.SIGTERM)
    assert sidecar.process.wait(timeout=10) == 0
    lines = [line for line in sidecar.process.read_log().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]
    assert {"ts", "level", "logger", "message"} <= set(entries[0])
    assert any(e["message"].startswith("serving ext_authz on") for e in entries)
    assert entries[-1]["message"] == "stopped"


def test_debug_logs_hold_no_per_call_library_lines(tmp_path: Path) -> None:
    sidecar = start_sidecar(
        tmp_path,
        database_url=f"sqlite:///{tmp_path / 'a.db'}",
        env={"AUTHZ_LOG_FORMAT": "json", "AUTHZ_LOG_LEVEL": "debug"},
    )
    try:
        assert [sidecar.decide("sk-oais_not-a-key") for _ in range(5)] == [401] * 5
        sidecar.process.send_signal(signal.SIGTERM)
        assert sidecar.process.wait(timeout=30) == 0
    finally:
        sidecar.process.stop()
    entries = [json.loads(line) for line in sidecar.process.read_log().splitlines() if line]
    assert entries[-1]["message"] == "stopped"
    library_debug = [
        e for e in entries if e["level"] == "debug" and not e["logger"].startswith("authz")
    ]
    assert library_debug == []
