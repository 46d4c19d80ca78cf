"""deploy/istio: the central authorizer, the CUSTOM policy and the mesh extension provider.

The AuthorizationPolicy and MeshConfig schemas are hand-written subsets (see schemas/README.md);
the Kubernetes objects are validated strictly by test_kubernetes.py.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import jsonschema
import pytest

from tests.deploy.conftest import (
    AUTHZ_SERVICE,
    DEPLOY,
    REPO,
    SCHEMAS,
    Manifest,
    container,
    env_of,
    load_yaml,
    only,
)

Kustomize = Callable[[str], tuple[Manifest, ...]]
ISTIO = DEPLOY / "istio"


def schema_validator(name: str) -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMAS / name).read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.fixture(scope="module")
def policy_schema() -> jsonschema.protocols.Validator:
    return schema_validator("istio-authorizationpolicy-v1.subset.schema.json")


@pytest.fixture(scope="module")
def mesh_schema() -> jsonschema.protocols.Validator:
    return schema_validator("istio-meshconfig-extauthz.subset.schema.json")


@pytest.fixture(scope="module")
def policy() -> dict[str, Any]:
    loaded: dict[str, Any] = load_yaml(ISTIO / "authorization-policy.yaml")
    return loaded


@pytest.fixture(scope="module")
def provider() -> dict[str, Any]:
    values = load_yaml(ISTIO / "istiod-values.yaml")
    (found,) = [p for p in values["meshConfig"]["extensionProviders"] if "envoyExtAuthzGrpc" in p]
    result: dict[str, Any] = found
    return result


def errors(validator: jsonschema.protocols.Validator, instance: Any) -> list[str]:
    return [f"{e.json_path}: {e.message}" for e in validator.iter_errors(instance)]


def test_authorization_policy_validates(
    policy_schema: jsonschema.protocols.Validator, policy: dict[str, Any]
) -> None:
    assert errors(policy_schema, policy) == []


def test_policy_is_custom_on_every_path_with_the_shipped_provider(
    policy: dict[str, Any], provider: dict[str, Any]
) -> None:
    """Deny by default: one empty rule, which Istio matches against every request."""
    spec = policy["spec"]
    assert spec["action"] == "CUSTOM"
    assert spec["provider"]["name"] == provider["name"]
    assert spec["rules"] == [{}]


@pytest.mark.parametrize(
    ("mutate", "why"),
    [
        (lambda p: p["spec"].update(action="ALLOWED"), "unknown action"),
        (lambda p: p["spec"].pop("provider"), "CUSTOM without a provider"),
        (lambda p: p["spec"]["rules"][0].update(to=[{"operation": {"path": ["/v1/*"]}}]), "typo"),
        (lambda p: p["spec"].update(targetRefs=[{"kind": "Gateway", "name": "g"}]), "both"),
        (lambda p: p.update(apiVersion="security.istio.io/v2"), "no such version"),
    ],
)
def test_policy_schema_rejects_mistakes(
    policy_schema: jsonschema.protocols.Validator,
    policy: dict[str, Any],
    mutate: Callable[[dict[str, Any]], object],
    why: str,
) -> None:
    """Negative controls: the subset schema is not a rubber stamp."""
    broken = copy.deepcopy(policy)
    mutate(broken)
    assert errors(policy_schema, broken), why


def test_mesh_config_validates_and_both_forms_agree(
    mesh_schema: jsonschema.protocols.Validator,
) -> None:
    values = load_yaml(ISTIO / "istiod-values.yaml")
    operator = load_yaml(ISTIO / "istio-operator.yaml")
    assert errors(mesh_schema, values) == []
    assert operator["apiVersion"] == "install.istio.io/v1alpha1"
    assert operator["kind"] == "IstioOperator"
    assert errors(mesh_schema, operator["spec"]) == []
    assert operator["spec"]["meshConfig"] == values["meshConfig"]


def test_mesh_schema_rejects_a_misspelt_provider_field(
    mesh_schema: jsonschema.protocols.Validator,
) -> None:
    values = load_yaml(ISTIO / "istiod-values.yaml")
    grpc = values["meshConfig"]["extensionProviders"][0]["envoyExtAuthzGrpc"]
    grpc["failureModeAllow"] = False  # Envoy's name, not Istio's
    assert errors(mesh_schema, values)


def test_provider_matches_the_envoy_ext_authz_settings(provider: dict[str, Any]) -> None:
    """Istio builds the same ext_authz filter as envoy.yaml's, from these fields."""
    envoy = load_yaml(REPO / "envoy.yaml")
    hcm = envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    (ext_authz,) = [
        f["typed_config"]
        for f in hcm["typed_config"]["http_filters"]
        if f["name"] == "envoy.filters.http.ext_authz"
    ]
    grpc = provider["envoyExtAuthzGrpc"]
    assert grpc["timeout"] == ext_authz["grpc_service"]["timeout"] == "2s"
    assert grpc["failOpen"] is ext_authz["failure_mode_allow"] is False
    assert grpc["statusOnError"] == str(ext_authz["status_on_error"]["code"]) == "503"
    body = ext_authz["with_request_body"]
    assert grpc["includeRequestBodyInCheck"] == {
        "maxRequestBytes": body["max_request_bytes"],
        "allowPartialMessage": body["allow_partial_message"],
        "packAsBytes": body["pack_as_bytes"],
    }


def test_provider_points_at_the_authorizer_service(
    kustomize: Kustomize, provider: dict[str, Any]
) -> None:
    manifests = kustomize("deploy/istio")
    service = only(manifests, "Service", "authz")
    namespace = service["metadata"]["namespace"]
    grpc = provider["envoyExtAuthzGrpc"]
    assert grpc["service"] == f"authz.{namespace}.svc.cluster.local"
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == grpc["port"]]
    assert port["appProtocol"] == "grpc"
    assert port["name"].startswith("grpc")
    deployment = only(manifests, "Deployment", "authz")
    authz = container(deployment["spec"]["template"]["spec"], "authz")
    (target,) = [p for p in authz["ports"] if p["name"] == port["targetPort"]]
    assert target["containerPort"] == 9191
    assert only(manifests, "Namespace")["metadata"]["name"] == namespace


def test_central_authorizer_is_replicated_on_postgres_and_redis(kustomize: Kustomize) -> None:
    manifests = kustomize("deploy/istio")
    deployment = only(manifests, "Deployment", "authz")
    assert deployment["spec"]["replicas"] >= 3
    pod = deployment["spec"]["template"]["spec"]
    authz = container(pod, "authz")
    env = env_of(authz)
    for name, key in (("AUTHZ_DATABASE_URL", "database-url"), ("AUTHZ_REDIS_URL", "redis-url")):
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "authz-backends", "key": key}
    assert authz["readinessProbe"]["grpc"]["service"] == AUTHZ_SERVICE
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    pdb = only(manifests, "PodDisruptionBudget", "authz")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1
    job = only(manifests, "Job", "authz-migrate")
    annotations = job["spec"]["template"]["metadata"]["annotations"]
    assert annotations["sidecar.istio.io/inject"] == "false", "else the Job never completes"
    assert not any(m["kind"] == "AuthorizationPolicy" for m in manifests)
