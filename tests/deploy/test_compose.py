"""deploy/compose.yaml: valid against the Compose spec, wired in the right order, healthy."""

from __future__ import annotations

import copy
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from deploy.render import COMPOSE
from tests.deploy.conftest import AUTHZ_SERVICE, REPO, SCHEMAS, load_yaml
from tests.support.procs import ManagedProcess, free_port

COMPOSE_FILE = REPO / "deploy/compose.yaml"
AUTHZ_IMAGE_SERVICES = ("migrate", "authz", "upstream")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = load_yaml(COMPOSE_FILE)
    return loaded


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text(encoding="utf-8"))
    # The file names its draft as "http://json-schema.org/draft/2019-09/schema#", which
    # jsonschema does not recognise; it is draft 2019-09.
    jsonschema.Draft201909Validator.check_schema(schema)
    return jsonschema.Draft201909Validator(schema)


def test_compose_file_validates_against_the_compose_spec(
    compose: dict[str, Any], validator: jsonschema.protocols.Validator
) -> None:
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []


def test_schema_rejects_a_misspelt_key(
    compose: dict[str, Any], validator: jsonschema.protocols.Validator
) -> None:
    """Negative control: the schema is strict about service keys."""
    broken = copy.deepcopy(compose)
    broken["services"]["authz"]["depend_on"] = ["postgres"]
    assert not validator.is_valid(broken)


def test_images_are_pinned(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        image = service["image"]
        assert ":" in image, name
        assert not image.endswith(":latest"), name


def test_migrations_run_before_the_sidecar_serves(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["migrate"]["command"] == ["authz", "migrate"]
    assert services["migrate"]["restart"] == "no"
    assert services["migrate"]["depends_on"]["postgres"] == {"condition": "service_healthy"}
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    authz = services["authz"]["depends_on"]
    assert authz["migrate"] == {"condition": "service_completed_successfully"}
    assert authz["redis"] == {"condition": "service_healthy"}
    assert services["envoy"]["depends_on"]["authz"] == {"condition": "service_healthy"}
    assert services["migrate"]["environment"] == services["authz"]["environment"]


def test_sidecar_containers_are_hardened(compose: dict[str, Any]) -> None:
    for name in (*AUTHZ_IMAGE_SERVICES, "envoy"):
        service = compose["services"][name]
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert "/tmp" in service["tmpfs"], name
        assert "no-new-privileges:true" in service["security_opt"], name
    assert compose["services"]["envoy"]["user"] == "101:101"


def test_envoy_runs_the_generated_config_and_reaches_the_right_services(
    compose: dict[str, Any],
) -> None:
    envoy = compose["services"]["envoy"]
    mounts = dict(v.split(":")[:2] for v in envoy["volumes"])
    config_path = envoy["command"][envoy["command"].index("-c") + 1]
    source = next(host for host, inside in mounts.items() if inside == config_path)
    assert (COMPOSE_FILE.parent / source).resolve() == (REPO / COMPOSE.output).resolve()

    services = compose["services"]
    for cluster, endpoint in COMPOSE.clusters.items():
        assert endpoint.host in services, f"cluster {cluster} points at a missing service"
    # The sidecar listens where the image says (compose does not override it).
    assert "AUTHZ_GRPC_ADDR" not in services["authz"]["environment"]
    image_env = re.search(r"AUTHZ_GRPC_ADDR=(\S+)", (REPO / "Dockerfile").read_text("utf-8"))
    assert image_env is not None
    assert image_env.group(1) == f"0.0.0.0:{COMPOSE.clusters['authz'].port}"
    upstream = services["upstream"]["command"]
    assert upstream[upstream.index("--port") + 1] == str(COMPOSE.clusters["upstream"].port)
    assert upstream[upstream.index("--host") + 1] == "0.0.0.0"


def test_published_ports_stay_on_the_hosts_loopback(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name}: {port}"


# --- The health checks the file ships, run for real against the processes they check --------


def _healthcheck(compose: dict[str, Any], service: str, address: str) -> str:
    test = compose["services"][service]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    code: str = test[3]
    return code.replace("127.0.0.1:9191", address).replace("127.0.0.1:8000", address)


def _run(code: str) -> int:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=30, check=False
    ).returncode


def _until_healthy(code: str, proc: ManagedProcess, deadline: float) -> None:
    while _run(code) != 0:
        assert proc.is_running(), proc.read_log()
        assert time.monotonic() < deadline, proc.read_log()
        time.sleep(0.2)


def test_sidecar_healthcheck_follows_readiness_and_sigterm(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    grpc_port, metrics_port = free_port(), free_port()
    code = _healthcheck(compose, "authz", f"127.0.0.1:{grpc_port}")
    assert AUTHZ_SERVICE in code
    env = {
        "AUTHZ_DATABASE_URL": f"sqlite:///{tmp_path / 'authz.db'}",
        "AUTHZ_GRPC_ADDR": f"127.0.0.1:{grpc_port}",
        "AUTHZ_METRICS_ADDR": f"127.0.0.1:{metrics_port}",
        "AUTHZ_DRAIN_DELAY_S": "3",
        "AUTHZ_SHUTDOWN_GRACE_S": "1",
    }
    with ManagedProcess(
        [sys.executable, "-m", "authz", "serve"], log_dir=tmp_path, name="authz", env=env
    ) as sidecar:
        _until_healthy(code, sidecar, time.monotonic() + 30)
        sidecar.send_signal(signal.SIGTERM)
        assert _run(code) != 0, "NOT_SERVING during the drain"
        assert sidecar.wait(timeout=15) == 0, sidecar.read_log()


def test_upstream_healthcheck_passes_against_the_demo_upstream(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    port = free_port()
    code = _healthcheck(compose, "upstream", f"127.0.0.1:{port}")
    command = compose["services"]["upstream"]["command"]
    args = [sys.executable, *command[1:]]
    args[args.index("--host") + 1] = "127.0.0.1"
    args[args.index("--port") + 1] = str(port)
    with ManagedProcess(args, log_dir=tmp_path, name="upstream") as upstream:
        _until_healthy(code, upstream, time.monotonic() + 20)
