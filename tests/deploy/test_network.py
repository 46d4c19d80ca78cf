"""Who can reach the sidecar's gRPC port (Check, access logs, key API): Envoy, and no one else.

Kubernetes: a NetworkPolicy admits Envoy's listener and the metrics port only. Istio: the central
authorizer admits only the calling proxies' mesh identities on 9191, under STRICT mutual TLS.
Compose: the port is not published, and only Envoy shares the sidecar's internal network.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import (
    DEPLOY,
    K8S_OVERLAYS,
    Manifest,
    container,
    env_of,
    load_yaml,
    only,
)
from tests.deploy.crd import crd_errors

Kustomize = Callable[[str], tuple[Manifest, ...]]
GRPC_PORT = 9191
HEALTH_PORT = 9192
METRICS_PORT = 9464
AUTHORIZATION_POLICY = "authorizationpolicies.security.istio.io.v1"
PEER_AUTHENTICATION = "peerauthentications.security.istio.io.v1"


def container_ports(pod_spec: Manifest) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in pod_spec["containers"] for p in c["ports"]}


@pytest.mark.parametrize("overlay", K8S_OVERLAYS)
def test_network_policy_admits_envoy_and_scrapes_only(kustomize: Kustomize, overlay: str) -> None:
    manifests = kustomize(overlay)
    policy = only(manifests, "NetworkPolicy")
    deployment = only(manifests, "Deployment", "authz-gateway")
    pod = deployment["spec"]["template"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    ports = container_ports(pod["spec"])
    admitted: dict[int, list[Any]] = {}
    for rule in policy["spec"]["ingress"]:
        for port in rule["ports"]:
            number = ports[port["port"]] if isinstance(port["port"], str) else port["port"]
            admitted[number] = rule.get("from", ["anyone"])
    assert admitted == {
        8080: ["anyone"],
        METRICS_PORT: [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
        ],
    }
    # The sidecar's gRPC port is on the pod's loopback (only Envoy reaches it); the pod IP has
    # the health-only port, which no rule admits either (the kubelet's probes need none).
    authz = container(pod["spec"], "authz")
    assert env_of(authz)["AUTHZ_GRPC_ADDR"]["value"] == f"127.0.0.1:{GRPC_PORT}"
    assert authz["ports"][0]["containerPort"] == HEALTH_PORT
    assert {GRPC_PORT, HEALTH_PORT}.isdisjoint(admitted)


def authorizer_policies() -> dict[str, dict[str, Any]]:
    text = (DEPLOY / "istio" / "authorizer-policy.yaml").read_text(encoding="utf-8")
    return {doc["kind"]: doc for doc in yaml.safe_load_all(text)}


def test_authorizer_policies_validate_against_istios_crds() -> None:
    found = authorizer_policies()
    assert set(found) == {"AuthorizationPolicy", "PeerAuthentication"}
    assert crd_errors(AUTHORIZATION_POLICY, found["AuthorizationPolicy"]) == []
    assert crd_errors(PEER_AUTHENTICATION, found["PeerAuthentication"]) == []


@pytest.mark.parametrize(
    ("kind", "mutate"),
    [
        ("PeerAuthentication", lambda o: o["spec"]["mtls"].update(mode="STRICTEST")),
        ("PeerAuthentication", lambda o: o["spec"].update(portLevelMTLS={})),
        ("AuthorizationPolicy", lambda o: o["spec"].update(action="ALLOWED")),
        ("AuthorizationPolicy", lambda o: o["spec"]["rules"][0]["from"][0].update(src={})),
    ],
)
def test_istio_crd_schemas_reject_mistakes(
    kind: str, mutate: Callable[[dict[str, Any]], object]
) -> None:
    schema = {
        "PeerAuthentication": PEER_AUTHENTICATION,
        "AuthorizationPolicy": AUTHORIZATION_POLICY,
    }
    broken = copy.deepcopy(authorizer_policies()[kind])
    mutate(broken)
    assert crd_errors(schema[kind], broken)


def test_authorizer_admits_only_the_calling_proxies_on_grpc(kustomize: Kustomize) -> None:
    found = authorizer_policies()
    manifests = kustomize("deploy/istio")
    deployment = only(manifests, "Deployment", "authz")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    namespace = deployment["metadata"]["namespace"]
    assert container_ports(deployment["spec"]["template"]["spec"]) == {
        "grpc": GRPC_PORT,
        "metrics": METRICS_PORT,
    }
    policy, peer = found["AuthorizationPolicy"], found["PeerAuthentication"]
    for obj in (policy, peer):
        assert obj["metadata"]["namespace"] == namespace
        assert obj["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert policy["spec"]["action"] == "ALLOW"
    grpc_rules = [
        r for r in policy["spec"]["rules"] if r["to"] == [{"operation": {"ports": ["9191"]}}]
    ]
    (grpc_rule,) = grpc_rules
    (source,) = grpc_rule["from"]
    assert list(source) == ["source"]
    assert list(source["source"]) == ["principals"], "identities only, no wider match"
    principals = source["source"]["principals"]
    assert "cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account" in principals
    # The shipped CUSTOM policy runs on the API workloads' sidecars: their namespace's identity.
    custom = load_yaml(DEPLOY / "istio" / "authorization-policy.yaml")
    assert any(
        p.startswith(f"cluster.local/ns/{custom['metadata']['namespace']}/sa/") for p in principals
    )
    # Every other rule is for the metrics port only.
    others = [r for r in policy["spec"]["rules"] if r is not grpc_rule]
    assert others == [{"to": [{"operation": {"ports": [str(METRICS_PORT)]}}]}]
    # Identities are only verified under mutual TLS: STRICT, except the metrics port.
    assert peer["spec"]["mtls"] == {"mode": "STRICT"}
    assert peer["spec"]["portLevelMtls"] == {METRICS_PORT: {"mode": "PERMISSIVE"}}


def test_compose_publishes_no_grpc_port_and_only_envoy_shares_its_network() -> None:
    compose = load_yaml(DEPLOY / "compose.yaml")
    services = compose["services"]
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).split(":")[-1] != str(GRPC_PORT), f"{name} publishes {port}"
    networks = compose["networks"]
    sidecar = set(services["authz"]["networks"])
    neighbours = {
        name
        for name, service in services.items()
        if name != "authz" and sidecar & set(service.get("networks", ["default"]))
    }
    # The stores and the one-shot migration share `data`; the upstream (the API) shares nothing.
    assert neighbours == {"envoy", "postgres", "redis", "migrate"}
    (private,) = sidecar - set(services["postgres"]["networks"])
    assert networks[private] == {"internal": True}
    assert {n for n, s in services.items() if private in s.get("networks", [])} == {
        "authz",
        "envoy",
    }
