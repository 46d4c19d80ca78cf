"""deploy/envoy-gateway: ext_authz, access logs and usage extraction under Envoy Gateway.

Every object is validated against Envoy Gateway's and Gateway API's published CRD schemas
(schemas/crds/); the CEL rules those CRDs carry, which no schema validator runs, are checked by
hand for the fields we use. The generated EnvoyPatchPolicy is applied, as Envoy Gateway would, to
a listener of the shape Envoy Gateway builds, and real Envoy validates the result.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy import render_mesh
from deploy.render import TRANSCODER
from tests.deploy.conftest import DEPLOY, REPO, load_yaml
from tests.deploy.crd import crd, crd_errors
from tests.deploy.test_mesh import envoy_validate, public_hcm

Kustomize = Callable[[str], tuple[dict[str, Any], ...]]
GATEWAY = DEPLOY / "envoy-gateway"
SCHEMA_OF = {
    "GatewayClass": "gatewayclasses.gateway.networking.k8s.io.v1",
    "Gateway": "gateways.gateway.networking.k8s.io.v1",
    "ReferenceGrant": "referencegrants.gateway.networking.k8s.io.v1beta1",
    "SecurityPolicy": "securitypolicies.gateway.envoyproxy.io.v1alpha1",
    "EnvoyProxy": "envoyproxies.gateway.envoyproxy.io.v1alpha1",
    "EnvoyPatchPolicy": "envoypatchpolicies.gateway.envoyproxy.io.v1alpha1",
}
LISTENER = render_mesh.GatewayListener()


def objects() -> dict[str, dict[str, Any]]:
    """Every object under deploy/envoy-gateway, by kind (one of each)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(GATEWAY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            assert doc["kind"] not in found, f"two {doc['kind']} objects"
            found[doc["kind"]] = doc
    return found


def ext_authz_source() -> dict[str, Any]:
    (found,) = [
        f["typed_config"]
        for f in public_hcm(load_yaml(REPO / "envoy.yaml"))["http_filters"]
        if f["name"] == render_mesh.EXT_AUTHZ
    ]
    result: dict[str, Any] = found
    return result


def test_every_object_validates_against_its_crd() -> None:
    found = objects()
    assert set(found) == set(SCHEMA_OF)
    for kind, obj in found.items():
        api_version, crd_kind, _ = crd(SCHEMA_OF[kind])
        assert (obj["apiVersion"], obj["kind"]) == (api_version, crd_kind)
        assert crd_errors(SCHEMA_OF[kind], obj) == [], kind


@pytest.mark.parametrize(
    ("kind", "mutate"),
    [
        ("SecurityPolicy", lambda o: o["spec"]["extAuth"].update(grpcService={})),
        ("SecurityPolicy", lambda o: o["spec"]["extAuth"].update(statusOnError=599)),
        ("SecurityPolicy", lambda o: o["spec"]["extAuth"].update(timeout="0.25s")),
        (
            "EnvoyProxy",
            lambda o: o["spec"]["telemetry"]["accessLog"]["settings"][0].update(type="X"),
        ),
        (
            "EnvoyProxy",
            lambda o: o["spec"]["telemetry"]["accessLog"]["settings"][0]["sinks"][0]["als"].update(
                log_name="x"
            ),
        ),
        ("EnvoyPatchPolicy", lambda o: o["spec"].update(type="MergePatch")),
        ("ReferenceGrant", lambda o: o["spec"]["to"][0].update(port=9191)),
        ("Gateway", lambda o: o["spec"]["listeners"][0].update(port=70000)),
    ],
)
def test_crd_schemas_reject_mistakes(kind: str, mutate: Callable[[dict[str, Any]], object]) -> None:
    """Negative controls: the schemas are not rubber stamps (Envoy's `0.25s` is not
    Envoy Gateway's duration format, for one)."""
    broken = copy.deepcopy(objects()[kind])
    mutate(broken)
    assert crd_errors(SCHEMA_OF[kind], broken)


def cel_backend_refs(refs: list[dict[str, Any]]) -> None:
    """The CRDs' CEL rules on backendRefs, for the values we use."""
    assert refs, "at least one backendRef"
    for ref in refs:
        assert ref["kind"] == "Service"
        assert ref["group"] == ""


def test_security_policy_is_envoy_yamls_ext_authz_to_the_authorizer(
    kustomize: Kustomize,
) -> None:
    policy = objects()["SecurityPolicy"]
    ext_auth = policy["spec"]["extAuth"]
    # CEL: exactly one of grpc/http; targetRefs of Gateway API kinds.
    assert "grpc" in ext_auth
    assert "http" not in ext_auth
    assert "backendRef" not in ext_auth["grpc"]
    cel_backend_refs(ext_auth["grpc"]["backendRefs"])
    (target,) = policy["spec"]["targetRefs"]
    assert target == {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "eg"}
    source = ext_authz_source()
    assert ext_auth["timeout"] == "2s"
    assert source["grpc_service"]["timeout"] == "2s"
    assert ext_auth["failOpen"] is source["failure_mode_allow"] is False
    assert ext_auth["statusOnError"] == source["status_on_error"]["code"] == 503
    body = source["with_request_body"]
    assert ext_auth["bodyToExtAuth"] == {"maxRequestBytes": body["max_request_bytes"]}
    assert_is_the_authorizer(kustomize, ext_auth["grpc"]["backendRefs"])


def assert_is_the_authorizer(kustomize: Kustomize, refs: list[dict[str, Any]]) -> None:
    """The central authorizer deploy/istio renders: its Service, namespace and gRPC port."""
    manifests = kustomize("deploy/istio")
    # `authz` (Envoy Gateway gives the ALS sink a cluster of its own already; Istio's provider
    # uses `authz-usage` for that).
    (service,) = [
        m for m in manifests if m["kind"] == "Service" and m["metadata"]["name"] == "authz"
    ]
    (grpc_port,) = [p["port"] for p in service["spec"]["ports"] if p["appProtocol"] == "grpc"]
    for ref in refs:
        assert (ref["name"], ref["namespace"], ref["port"]) == (
            service["metadata"]["name"],
            service["metadata"]["namespace"],
            grpc_port,
        )


def test_envoy_proxy_sends_http_access_logs_to_the_authorizer(kustomize: Kustomize) -> None:
    found = objects()
    (setting,) = found["EnvoyProxy"]["spec"]["telemetry"]["accessLog"]["settings"]
    assert setting["type"] == "Route"
    (sink,) = setting["sinks"]
    # CEL: type ALS has `als`; `als.http` only with type HTTP; backendRefs, never backendRef.
    assert sink["type"] == "ALS"
    assert sink["als"]["type"] == "HTTP"
    assert "backendRef" not in sink["als"]
    cel_backend_refs(sink["als"]["backendRefs"])
    assert_is_the_authorizer(kustomize, sink["als"]["backendRefs"])
    source = load_yaml(REPO / "envoy.yaml")
    (access_log,) = public_hcm(source)["access_log"]
    common = access_log["typed_config"]["common_config"]
    assert sink["als"]["logName"] == common["log_name"]
    # Room for a burst, as envoy.yaml's access-log cluster (Envoy Gateway's default: 32 KiB).
    (cluster,) = [
        c
        for c in source["static_resources"]["clusters"]
        if c["name"] == common["grpc_service"]["envoy_grpc"]["cluster_name"]
    ]
    limit = sink["als"]["backendSettings"]["connection"]["bufferLimit"]
    number, unit = limit[:-2], limit[-2:]
    assert (
        int(number) * {"Ki": 1024, "Mi": 1024**2}[unit]
        == cluster["per_connection_buffer_limit_bytes"]
    )
    # The Gateway uses this EnvoyProxy.
    gateway = found["Gateway"]
    ref = gateway["spec"]["infrastructure"]["parametersRef"]
    assert (ref["kind"], ref["name"]) == ("EnvoyProxy", found["EnvoyProxy"]["metadata"]["name"])
    assert gateway["metadata"]["namespace"] == found["EnvoyProxy"]["metadata"]["namespace"]
    assert gateway["spec"]["gatewayClassName"] == found["GatewayClass"]["metadata"]["name"]


def test_reference_grant_admits_exactly_the_two_cross_namespace_references() -> None:
    found = objects()
    grant = found["ReferenceGrant"]
    assert grant["metadata"]["namespace"] == "authz-system"
    admitted = {(f["kind"], f["namespace"]) for f in grant["spec"]["from"]}
    assert admitted == {
        (kind, found[kind]["metadata"]["namespace"]) for kind in ("SecurityPolicy", "EnvoyProxy")
    }
    assert grant["spec"]["to"] == [{"group": "", "kind": "Service", "name": "authz"}]


def test_patch_policy_names_match_the_gateway_and_the_security_policy() -> None:
    found = objects()
    gateway, policy = found["Gateway"], found["SecurityPolicy"]
    assert (LISTENER.namespace, LISTENER.gateway) == (
        gateway["metadata"]["namespace"],
        gateway["metadata"]["name"],
    )
    assert LISTENER.section in [listener["name"] for listener in gateway["spec"]["listeners"]]
    assert LISTENER.security_policy == policy["metadata"]["name"]
    patch_policy = found["EnvoyPatchPolicy"]
    assert patch_policy["spec"]["targetRef"]["name"] == gateway["metadata"]["name"]
    assert patch_policy["metadata"]["namespace"] == gateway["metadata"]["namespace"]
    assert {p["name"] for p in patch_policy["spec"]["jsonPatches"]} == {LISTENER.xds_name}


def eg_listener() -> dict[str, Any]:
    """The HCM part of the listener Envoy Gateway builds for the Gateway and SecurityPolicy
    (its translator's shape: default_filter_chain, ext_authz named after the policy, with
    only max_request_bytes in with_request_body, then the router)."""
    ext_authz = copy.deepcopy(ext_authz_source())
    ext_authz["with_request_body"] = {
        "max_request_bytes": objects()["SecurityPolicy"]["spec"]["extAuth"]["bodyToExtAuth"][
            "maxRequestBytes"
        ]
    }
    filters = [
        {"name": LISTENER.ext_authz_filter, "typed_config": ext_authz},
        {"name": "envoy.filters.http.router", "typed_config": {"@type": "x"}},
    ]
    return {"default_filter_chain": {"filters": [{"typed_config": {"http_filters": filters}}]}}


BODY_PATH = re.compile(r"^\.\.http_filters\[\?\(@\.name=='([^']+)'\)\]\.typed_config\.(\w+)$")


def apply(listener: dict[str, Any], operation: dict[str, Any]) -> None:
    """RFC 6902 `add` at a JSON pointer, after resolving the one JSONPath form we use (a filter
    by exact name) as Envoy Gateway does: JSONPath result + `path`."""
    assert operation["op"] == "add"
    pointer = operation["path"]
    if "jsonPath" in operation:
        matched = BODY_PATH.match(operation["jsonPath"])
        assert matched, operation["jsonPath"]
        filters = listener["default_filter_chain"]["filters"][0]["typed_config"]["http_filters"]
        (index,) = [i for i, f in enumerate(filters) if f["name"] == matched[1]]
        prefix = f"/default_filter_chain/filters/0/typed_config/http_filters/{index}"
        pointer = f"{prefix}/typed_config/{matched[2]}{pointer}"
    *parents, last = [int(p) if p.isdigit() else p for p in pointer.lstrip("/").split("/")]
    node: Any = listener
    for part in parents:
        node = node[part]
    if isinstance(node, list):
        node.insert(int(last), operation["value"])
    else:
        node[last] = operation["value"]


def patched_filters() -> list[dict[str, Any]]:
    listener = eg_listener()
    for patch in objects()["EnvoyPatchPolicy"]["spec"]["jsonPatches"]:
        apply(listener, copy.deepcopy(patch["operation"]))
    hcm = listener["default_filter_chain"]["filters"][0]["typed_config"]
    filters: list[dict[str, Any]] = hcm["http_filters"]
    return filters


def test_patch_policy_gives_envoy_gateway_envoy_yamls_filters() -> None:
    filters = patched_filters()
    assert [f["name"] for f in filters] == [
        *render_mesh.USAGE_FILTERS,
        LISTENER.ext_authz_filter,
        "envoy.filters.http.router",
    ]
    source = public_hcm(load_yaml(REPO / "envoy.yaml"))["http_filters"]
    by_name = {f["name"]: f for f in source}
    for usage in filters[:2]:
        assert usage == {
            "name": usage["name"],
            "typed_config": by_name[usage["name"]]["typed_config"],
        }
    # With the patch, the body goes to the sidecar exactly as envoy.yaml sends it.
    assert filters[2]["typed_config"] == ext_authz_source()


def test_real_envoy_accepts_the_patched_gateway_filters(envoy: str, tmp_path: Path) -> None:
    """The patched chain (EG's filter names, the router from envoy.yaml) is a valid config."""
    config = load_yaml(REPO / "envoy.yaml")
    hcm = public_hcm(config)
    router = hcm["http_filters"][-1]
    kept = [f for f in hcm["http_filters"] if f["name"] == TRANSCODER]
    hcm["http_filters"] = [*kept, *patched_filters()[:-1], router]
    envoy_validate(envoy, config, tmp_path)
