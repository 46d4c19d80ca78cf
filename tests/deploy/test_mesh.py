"""Usage accounting under Istio: the ALS provider, the Telemetry resource and the EnvoyFilter.

The custom resources are checked against Istio's own CRD schemas (schemas/crds/), the mesh config
against Istio's own MeshConfig proto (schemas/istio-api/, compiled here with grpcio-tools' protoc
and parsed strictly, as istiod would), and the EnvoyFilter's filters by the real Envoy binary.
"""

from __future__ import annotations

import copy
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.message import Message

from deploy import render_mesh
from tests.deploy.conftest import DEPLOY, REPO, SCHEMAS, load_yaml
from tests.deploy.crd import crd_errors

ISTIO = DEPLOY / "istio"
ISTIO_API = SCHEMAS / "istio-api"
TELEMETRY = "telemetries.telemetry.istio.io.v1"
ENVOY_FILTER = "envoyfilters.networking.istio.io.v1alpha3"


def envoy_source() -> dict[str, Any]:
    loaded: dict[str, Any] = load_yaml(REPO / "envoy.yaml")
    return loaded


def public_hcm(config: dict[str, Any]) -> dict[str, Any]:
    (chain,) = config["static_resources"]["listeners"][0]["filter_chains"]
    hcm: dict[str, Any] = chain["filters"][0]["typed_config"]
    return hcm


@pytest.fixture(scope="module")
def mesh_config_class(tmp_path_factory: pytest.TempPathFactory) -> type[Message]:
    """istio.mesh.v1alpha1.MeshConfig, built from Istio's own .proto files."""
    from grpc_tools import protoc  # type: ignore[import-untyped]  # dev dependency, no stubs

    out = tmp_path_factory.mktemp("meshconfig") / "mesh.pb"
    well_known = Path(protoc.__file__).parent / "_proto"
    status = protoc.main(
        [
            "protoc",
            f"-I{ISTIO_API}",
            f"-I{well_known}",
            "--include_imports",
            f"--descriptor_set_out={out}",
            "mesh/v1alpha1/config.proto",
        ]
    )
    assert status == 0, "protoc could not compile Istio's MeshConfig proto"
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        pool.Add(file)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("istio.mesh.v1alpha1.MeshConfig")
    )


def providers() -> dict[str, dict[str, Any]]:
    values = load_yaml(ISTIO / "istiod-values.yaml")
    return {p["name"]: p for p in values["meshConfig"]["extensionProviders"]}


def test_mesh_config_parses_as_istios_meshconfig_proto(mesh_config_class: type[Message]) -> None:
    """Both forms of the mesh config are what istiod would accept, field for field."""
    values = load_yaml(ISTIO / "istiod-values.yaml")
    operator = load_yaml(ISTIO / "istio-operator.yaml")
    for mesh in (values["meshConfig"], operator["spec"]["meshConfig"]):
        parsed = json_format.ParseDict(mesh, mesh_config_class())
        kinds = [p.WhichOneof("provider") for p in parsed.extension_providers]  # type: ignore[attr-defined]
        assert kinds == ["envoy_ext_authz_grpc", "envoy_http_als"]


@pytest.mark.parametrize(
    ("mutate", "why"),
    [
        (lambda p: p[1]["envoyHttpAls"].update(log_name_x="x"), "unknown field"),
        (lambda p: p[1]["envoyHttpAls"].update(port="ninety"), "port is a number"),
        (lambda p: p[1].update(envoyHttpAlsV3=p[1].pop("envoyHttpAls")), "no such provider"),
    ],
)
def test_meshconfig_proto_rejects_mistakes(
    mesh_config_class: type[Message], mutate: Callable[[list[dict[str, Any]]], object], why: str
) -> None:
    """Negative controls: the proto parse is strict (`why` names the mistake)."""
    mesh = copy.deepcopy(load_yaml(ISTIO / "istiod-values.yaml")["meshConfig"])
    mutate(mesh["extensionProviders"])
    with pytest.raises(json_format.ParseError):  # else: Failed, DID NOT RAISE (for `why`)
        json_format.ParseDict(mesh, mesh_config_class())


def test_als_provider_reaches_the_authorizer_with_envoys_log_name() -> None:
    found = providers()
    authz = found["oais-authz"]["envoyExtAuthzGrpc"]
    als = found["oais-usage"]["envoyHttpAls"]
    # Another Service name (a cluster of its own, as envoy.yaml's `authz_access_log`) ...
    assert als["service"] != authz["service"]
    services = {
        f"{s['metadata']['name']}.authz-system.svc.cluster.local": s
        for s in yaml.safe_load_all((ISTIO / "service.yaml").read_text(encoding="utf-8"))
    }
    usage, checks = services[als["service"]], services[authz["service"]]
    # ... for the same pods and port.
    assert usage["spec"]["selector"] == checks["spec"]["selector"]
    (usage_port,) = [p for p in usage["spec"]["ports"] if p["port"] == als["port"]]
    (check_port,) = [p for p in checks["spec"]["ports"] if p["port"] == authz["port"]]
    assert (usage_port["targetPort"], usage_port["appProtocol"]) == (
        check_port["targetPort"],
        check_port["appProtocol"],
    )
    (access_log,) = public_hcm(envoy_source())["access_log"]
    assert als["logName"] == access_log["typed_config"]["common_config"]["log_name"]


def test_telemetry_validates_and_enables_the_als_provider_where_ext_authz_runs() -> None:
    telemetry = load_yaml(ISTIO / "telemetry.yaml")
    assert crd_errors(TELEMETRY, telemetry) == []
    policy = load_yaml(ISTIO / "authorization-policy.yaml")
    assert telemetry["metadata"]["namespace"] == policy["metadata"]["namespace"]
    assert telemetry["spec"]["selector"] == policy["spec"]["selector"]
    (logging,) = telemetry["spec"]["accessLogging"]
    assert logging["providers"] == [{"name": "oais-usage"}]
    assert "oais-usage" in providers()
    # The CUSTOM policy on a workload runs in its inbound (server-side) proxy.
    assert logging["match"]["mode"] == "SERVER"


@pytest.mark.parametrize(
    ("mutate", "why"),
    [
        (lambda t: t["spec"].update(accessLogs=t["spec"].pop("accessLogging")), "misspelt"),
        (lambda t: t["spec"]["accessLogging"][0]["match"].update(mode="INBOUND"), "enum"),
        (lambda t: t["spec"]["selector"].update(matchLabels="app"), "type"),
        (lambda t: t.update(apiVersion="telemetry.istio.io/v2"), "no such version"),
    ],
)
def test_telemetry_schema_rejects_mistakes(
    mutate: Callable[[dict[str, Any]], object], why: str
) -> None:
    """Negative controls: the CRD schema is not a rubber stamp."""
    telemetry = copy.deepcopy(load_yaml(ISTIO / "telemetry.yaml"))
    mutate(telemetry)
    assert crd_errors(TELEMETRY, telemetry), why


def test_envoy_filter_validates_and_copies_envoy_yamls_usage_filters() -> None:
    envoy_filter = load_yaml(ISTIO / "usage-envoyfilter.yaml")
    assert crd_errors(ENVOY_FILTER, envoy_filter) == []
    source_filters = [
        {"name": f["name"], "typed_config": f["typed_config"]}
        for f in public_hcm(envoy_source())["http_filters"]
        if f["name"] in render_mesh.USAGE_FILTERS
    ]
    patches = envoy_filter["spec"]["configPatches"]
    assert [p["patch"]["value"] for p in patches] == source_filters
    assert len(source_filters) == 2
    for patch in patches:
        assert patch["applyTo"] == "HTTP_FILTER"
        assert patch["match"]["context"] == "SIDECAR_INBOUND"
        assert patch["match"]["listener"]["filterChain"]["filter"]["subFilter"] == {
            "name": "envoy.filters.http.router"
        }
        assert patch["patch"]["operation"] == "INSERT_BEFORE"
    policy = load_yaml(ISTIO / "authorization-policy.yaml")
    assert envoy_filter["metadata"]["namespace"] == policy["metadata"]["namespace"]
    selector = policy["spec"]["selector"]["matchLabels"]
    assert envoy_filter["spec"]["workloadSelector"]["labels"] == selector


def test_envoy_filter_schema_rejects_mistakes() -> None:
    envoy_filter = load_yaml(ISTIO / "usage-envoyfilter.yaml")
    broken = copy.deepcopy(envoy_filter)
    broken["spec"]["configPatches"][0]["patch"]["operation"] = "INSERT_AFTER_ROUTER"
    assert crd_errors(ENVOY_FILTER, broken)
    broken = copy.deepcopy(envoy_filter)
    broken["spec"]["configPatches"][0]["match"]["context"] = "INBOUND"
    assert crd_errors(ENVOY_FILTER, broken)


def test_render_refuses_a_source_without_the_usage_filters() -> None:
    filters = [
        f
        for f in public_hcm(envoy_source())["http_filters"]
        if f["name"] != "envoy.filters.http.sse_to_metadata"
    ]
    with pytest.raises(render_mesh.MeshRenderError, match="sse_to_metadata"):
        render_mesh.usage_filters(filters)


def patched_envoy_config(inserted: list[dict[str, Any]]) -> dict[str, Any]:
    """envoy.yaml with its usage filters replaced by `inserted`, placed before the router as
    the patch would, and the upstream on a port that is never opened (validation only)."""
    config = envoy_source()
    hcm = public_hcm(config)
    kept = [f for f in hcm["http_filters"] if f["name"] not in render_mesh.USAGE_FILTERS]
    hcm["http_filters"] = [*kept[:-1], *inserted, kept[-1]]
    return config


def envoy_validate(envoy: str, config: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    result = subprocess.run(
        [envoy, "--mode", "validate", "-c", str(path), "--log-level", "warn"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_real_envoy_accepts_the_envoy_filters_patches(envoy: str, tmp_path: Path) -> None:
    patches = load_yaml(ISTIO / "usage-envoyfilter.yaml")["spec"]["configPatches"]
    envoy_validate(envoy, patched_envoy_config([p["patch"]["value"] for p in patches]), tmp_path)


def test_real_envoy_refuses_a_broken_patch(envoy: str, tmp_path: Path) -> None:
    """Negative control for the test above."""
    patches = load_yaml(ISTIO / "usage-envoyfilter.yaml")["spec"]["configPatches"]
    value = copy.deepcopy(patches[0]["patch"]["value"])
    value["typed_config"]["response_rules"]["rulez"] = value["typed_config"]["response_rules"].pop(
        "rules"
    )
    with pytest.raises(AssertionError):
        envoy_validate(envoy, patched_envoy_config([value]), tmp_path)
