"""deploy/render.py: the Compose and Kubernetes Envoy configs never drift from envoy.yaml."""

from __future__ import annotations

import base64
import copy
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy import render_mesh
from deploy.render import (
    AUTHZ_TLS_SOCKET,
    COMPOSE,
    KUBERNETES,
    SOURCE,
    TARGETS,
    TRANSCODER,
    Target,
    main,
    render,
    stale,
)
from tests.deploy.conftest import REPO, load_yaml

Path_ = tuple[str | int, ...]


def differences(a: Any, b: Any, at: Path_ = ()) -> Iterator[Path_]:
    """Every path where two YAML trees differ (a missing key counts as a difference)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in a.keys() | b.keys():
            if key not in a or key not in b:
                yield (*at, key)
            else:
                yield from differences(a[key], b[key], (*at, key))
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            yield from differences(x, y, (*at, index))
    elif a != b or type(a) is not type(b):
        yield at


def allowed_differences(source: dict[str, Any], target: Target) -> set[Path_]:
    """What a target may change, spelled out independently of render()."""
    allowed: set[Path_] = set()
    if target.admin_address is not None:
        allowed.add(("admin", "address", "socket_address", "address"))
    for i, _ in enumerate(source["static_resources"]["listeners"]):
        allowed.add(("static_resources", "listeners", i, "address", "socket_address", "address"))
    for j, cluster in enumerate(source["static_resources"]["clusters"]):
        if cluster["name"] in target.clusters:
            endpoint: Path_ = (
                "static_resources", "clusters", j, "load_assignment", "endpoints", 0,
                "lb_endpoints", 0, "endpoint", "address", "socket_address",
            )  # fmt: skip
            allowed |= {
                ("static_resources", "clusters", j, "type"),
                (*endpoint, "address"),
                (*endpoint, "port_value"),
            }
    for at, _ in transcoders(source):
        allowed |= {(*at, "proto_descriptor"), (*at, "proto_descriptor_bin")}
    return allowed


def transcoders(config: dict[str, Any]) -> Iterator[tuple[Path_, dict[str, Any]]]:
    """(path, typed_config) of every JSON transcoder in the config."""
    for i, listener in enumerate(config["static_resources"]["listeners"]):
        for c, chain in enumerate(listener["filter_chains"]):
            for f, network in enumerate(chain["filters"]):
                for h, http in enumerate(network["typed_config"].get("http_filters", [])):
                    if http["name"] == TRANSCODER:
                        at: Path_ = (
                            "static_resources", "listeners", i, "filter_chains", c, "filters", f,
                            "typed_config", "http_filters", h, "typed_config",
                        )  # fmt: skip
                        yield at, http["typed_config"]


def embedded(source: dict[str, Any]) -> dict[str, Any]:
    """The source with each transcoder descriptor file replaced by its bytes, as targets have."""
    config = copy.deepcopy(source)
    for _, typed in transcoders(config):
        path = typed.pop("proto_descriptor")
        typed["proto_descriptor_bin"] = base64.b64encode((REPO / path).read_bytes()).decode()
    return config


def ext_authz(config: dict[str, Any]) -> dict[str, Any]:
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    filters = hcm["typed_config"]["http_filters"]
    found = [f for f in filters if f["name"] == "envoy.filters.http.ext_authz"]
    assert len(found) == 1
    result: dict[str, Any] = found[0]["typed_config"]
    return result


@pytest.fixture(scope="module")
def source() -> dict[str, Any]:
    loaded: dict[str, Any] = load_yaml(REPO / SOURCE)
    return loaded


def test_generated_files_are_in_sync_with_envoy_yaml() -> None:
    assert stale(REPO) == [], "run: python deploy/render.py"


def test_render_script_check_passes_from_the_command_line() -> None:
    result = subprocess.run(
        [sys.executable, "deploy/render.py", "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.output.parent.name)
def test_only_addresses_and_cluster_endpoints_differ(
    source: dict[str, Any], target: Target
) -> None:
    generated = load_yaml(REPO / target.output)
    changed = set(differences(source, generated))
    assert changed, "a target that changes nothing should not exist"
    assert changed <= allowed_differences(source, target), changed - allowed_differences(
        source, target
    )


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.output.parent.name)
def test_filters_timeouts_ext_authz_and_health_checks_are_the_sources(
    source: dict[str, Any], target: Target
) -> None:
    generated = load_yaml(REPO / target.output)
    assert ext_authz(generated) == ext_authz(source)
    src_hcm = embedded(source)["static_resources"]["listeners"][0]["filter_chains"]
    gen_hcm = generated["static_resources"]["listeners"][0]["filter_chains"]
    assert gen_hcm == src_hcm, "filters, routes, timeouts and the descriptor must be identical"
    for src, gen in zip(
        source["static_resources"]["clusters"],
        generated["static_resources"]["clusters"],
        strict=True,
    ):
        assert gen["name"] == src["name"]
        for key in ("connect_timeout", "health_checks", "typed_extension_protocol_options"):
            assert gen.get(key) == src.get(key), f"cluster {src['name']}: {key} differs"


def test_kubernetes_envoy_reaches_the_sidecar_over_loopback() -> None:
    generated = load_yaml(REPO / KUBERNETES.output)
    authz = next(c for c in generated["static_resources"]["clusters"] if c["name"] == "authz")
    endpoint = authz["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 9191}
    assert generated["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


def test_generated_files_say_they_are_generated() -> None:
    for target in TARGETS:
        head = (REPO / target.output).read_text(encoding="utf-8").splitlines()[0]
        assert head.startswith("# Generated by deploy/render.py — do not edit")


def test_dns_targets_are_strict_dns() -> None:
    compose = load_yaml(REPO / COMPOSE.output)
    types = {c["name"]: c["type"] for c in compose["static_resources"]["clusters"]}
    assert types == dict.fromkeys(
        ("authz", "authz_access_log", "upstream", "console"), "STRICT_DNS"
    )


def _copy_tree(tmp_path: Path) -> Path:
    descriptors = [
        Path(typed["proto_descriptor"]) for _, typed in transcoders(load_yaml(REPO / SOURCE))
    ]
    for relative in [SOURCE, *descriptors, *(t.output for t in TARGETS), *render_mesh.OUTPUTS]:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / relative, tmp_path / relative)
    return tmp_path


def test_check_fails_when_the_source_changes_and_render_fixes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _copy_tree(tmp_path)
    assert main(["--check", "--root", str(root)]) == 0
    text = (root / SOURCE).read_text(encoding="utf-8")
    (root / SOURCE).write_text(text.replace("timeout: 2s", "timeout: 0.3s", 1), encoding="utf-8")

    assert main(["--check", "--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert "deploy/compose/envoy.yaml is stale" in err
    assert "deploy/k8s/base/envoy.yaml is stale" in err

    assert main(["--root", str(root)]) == 0
    assert main(["--check", "--root", str(root)]) == 0
    regenerated = yaml.safe_load((root / KUBERNETES.output).read_text(encoding="utf-8"))
    assert ext_authz(regenerated)["grpc_service"]["timeout"] == "0.3s"


def test_a_source_without_a_cluster_a_target_moves_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _copy_tree(tmp_path)
    config = load_yaml(root / SOURCE)
    config["static_resources"]["clusters"] = [
        c for c in config["static_resources"]["clusters"] if c["name"] != "upstream"
    ]
    (root / SOURCE).write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["--check", "--root", str(root)]) == 2
    assert capsys.readouterr().err == "render: cluster upstream is not in the source config\n"


def test_a_new_loopback_cluster_must_be_placed_in_every_target(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A cluster added to envoy.yaml later must not silently point at Envoy's own container."""
    root = _copy_tree(tmp_path)
    config = load_yaml(root / SOURCE)
    extra = copy.deepcopy(config["static_resources"]["clusters"][1])
    extra["name"] = extra["load_assignment"]["cluster_name"] = "ratelimit"
    config["static_resources"]["clusters"].append(extra)
    (root / SOURCE).write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["--check", "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("render: cluster ratelimit points at 127.0.0.1")
    assert err.endswith("add it to that target in deploy/render.py\n")


def test_render_does_not_touch_its_input(source: dict[str, Any]) -> None:
    before = yaml.safe_dump(source)
    render(source, COMPOSE)
    assert yaml.safe_dump(source) == before


def test_every_envoy_config_carries_the_same_commented_tls_block() -> None:
    block: dict[str, Any] = yaml.safe_load(AUTHZ_TLS_SOCKET)
    tls = block["transport_socket"]["typed_config"]["common_tls_context"]
    assert tls["alpn_protocols"] == ["h2"]  # gRPC to the sidecar
    source = (REPO / "envoy.yaml").read_text(encoding="utf-8")
    assert "".join(f"      # {line}\n" for line in AUTHZ_TLS_SOCKET.splitlines()) in source
    for target in TARGETS:
        generated = (REPO / target.output).read_text(encoding="utf-8")
        assert "".join(f"#   {line}\n" for line in AUTHZ_TLS_SOCKET.splitlines()) in generated
