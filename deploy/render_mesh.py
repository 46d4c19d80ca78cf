"""Derive the mesh and gateway forms of envoy.yaml's usage extraction.

Usage accounting needs two things on the proxy that called ext_authz: the `json_to_metadata` and
`sse_to_metadata` filters (they copy the upstream's `usage` into the `oais.usage` namespace) and
an access log to the sidecar. Istio and Envoy Gateway build their Envoy configs themselves, so
the filters go in as patches: an Istio `EnvoyFilter` and an Envoy Gateway `EnvoyPatchPolicy`.
Both are copied from the top-level `envoy.yaml` (the one source of truth, as for deploy/render.py,
which writes and checks these files too); only the wrapping differs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# The filters that fill `oais.usage`, in envoy.yaml's order (they run after ext_authz).
USAGE_FILTERS = ("envoy.filters.http.json_to_metadata", "envoy.filters.http.sse_to_metadata")
HCM = "envoy.filters.network.http_connection_manager"
ROUTER = "envoy.filters.http.router"
EXT_AUTHZ = "envoy.filters.http.ext_authz"
# SecurityPolicy.extAuth.bodyToExtAuth has only maxRequestBytes. Without allow_partial_message
# Envoy answers 413 to a body over the limit instead of sending its first part; pack_as_bytes
# sends the body as raw bytes. Both as envoy.yaml has them.
BODY_FLAGS = ("allow_partial_message", "pack_as_bytes")
PART_OF = {"app.kubernetes.io/part-of": "oais-authz"}


class MeshRenderError(ValueError):
    """envoy.yaml does not have the usage filters these patches copy (one clear line)."""


@dataclass(frozen=True, slots=True)
class ApiWorkload:
    """Where the OpenAI-compatible API runs under Istio: the same namespace and selector as
    deploy/istio/authorization-policy.yaml and telemetry.yaml (a test keeps them equal)."""

    namespace: str = "llm"
    labels: tuple[tuple[str, str], ...] = (("app", "openai-api"),)


@dataclass(frozen=True, slots=True)
class GatewayListener:
    """The Envoy Gateway listener to patch and the SecurityPolicy on it: the names in
    deploy/envoy-gateway/gateway.yaml and securitypolicy.yaml (a test keeps them equal)."""

    namespace: str = "llm"
    gateway: str = "eg"
    section: str = "http"
    security_policy: str = "oais-authz"

    @property
    def xds_name(self) -> str:
        """Envoy Gateway names a listener namespace/gateway/section."""
        return f"{self.namespace}/{self.gateway}/{self.section}"

    @property
    def ext_authz_filter(self) -> str:
        """... and the ext_authz filter a SecurityPolicy adds, after the policy."""
        return f"{EXT_AUTHZ}/securitypolicy/{self.namespace}/{self.security_policy}"


ISTIO_OUTPUT = Path("deploy/istio/usage-envoyfilter.yaml")
GATEWAY_OUTPUT = Path("deploy/envoy-gateway/usage-envoypatchpolicy.yaml")
OUTPUTS = (ISTIO_OUTPUT, GATEWAY_OUTPUT)


def usage_filters(http_filters: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The usage filters exactly as envoy.yaml has them (name and typed_config), in its order."""
    found = [f for f in http_filters if f.get("name") in USAGE_FILTERS]
    names = [f["name"] for f in found]
    if names != list(USAGE_FILTERS):
        raise MeshRenderError(
            f"envoy.yaml must have the http filters {', '.join(USAGE_FILTERS)} once each, "
            f"in that order; found {names or 'none'}"
        )
    return [{"name": f["name"], "typed_config": f["typed_config"]} for f in found]


def istio_envoy_filter(
    filters: Iterable[Mapping[str, Any]], workload: ApiWorkload
) -> dict[str, Any]:
    """An EnvoyFilter putting the usage filters before the router of the API's inbound sidecar."""
    patches = [
        {
            "applyTo": "HTTP_FILTER",
            "match": {
                "context": "SIDECAR_INBOUND",
                "listener": {
                    "filterChain": {"filter": {"name": HCM, "subFilter": {"name": ROUTER}}}
                },
            },
            # Each goes just before the router, so they keep envoy.yaml's order.
            "patch": {"operation": "INSERT_BEFORE", "value": usage_filter},
        }
        for usage_filter in usage_filters(filters)
    ]
    return {
        "apiVersion": "networking.istio.io/v1alpha3",
        "kind": "EnvoyFilter",
        "metadata": {"name": "oais-usage", "namespace": workload.namespace, "labels": PART_OF},
        "spec": {
            "workloadSelector": {"labels": dict(workload.labels)},
            "configPatches": patches,
        },
    }


def body_flags(http_filters: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """envoy.yaml's ext_authz with_request_body flags that Envoy Gateway cannot express."""
    found = [f for f in http_filters if f.get("name") == EXT_AUTHZ]
    if len(found) != 1:
        raise MeshRenderError(f"envoy.yaml must have one {EXT_AUTHZ} filter, has {len(found)}")
    body = (found[0].get("typed_config") or {}).get("with_request_body") or {}
    return {flag: body[flag] for flag in BODY_FLAGS if flag in body}


def gateway_patch_policy(
    filters: Iterable[Mapping[str, Any]], listener: GatewayListener
) -> dict[str, Any]:
    """An EnvoyPatchPolicy adding the usage filters to an Envoy Gateway HTTP listener, and
    envoy.yaml's request-body flags to the SecurityPolicy's ext_authz filter."""
    filters = list(filters)
    listener_type = "type.googleapis.com/envoy.config.listener.v3.Listener"
    path = "/default_filter_chain/filters/0/typed_config/http_filters/0"
    # Each op inserts at the head, so the last filter goes in first to keep envoy.yaml's order.
    patches = [
        {
            "type": listener_type,
            "name": listener.xds_name,
            "operation": {"op": "add", "path": path, "value": usage_filter},
        }
        for usage_filter in reversed(usage_filters(filters))
    ]
    body = (
        f"..http_filters[?(@.name=='{listener.ext_authz_filter}')].typed_config.with_request_body"
    )
    patches += [
        {
            "type": listener_type,
            "name": listener.xds_name,
            "operation": {"op": "add", "jsonPath": body, "path": f"/{flag}", "value": value},
        }
        for flag, value in body_flags(filters).items()
    ]
    return {
        "apiVersion": "gateway.envoyproxy.io/v1alpha1",
        "kind": "EnvoyPatchPolicy",
        "metadata": {"name": "oais-usage", "namespace": listener.namespace, "labels": PART_OF},
        "spec": {
            "targetRef": {
                "group": "gateway.networking.k8s.io",
                "kind": "Gateway",
                "name": listener.gateway,
            },
            "type": "JSONPatch",
            "jsonPatches": patches,
        },
    }


def _text(document: Mapping[str, Any], source_name: str, about: list[str]) -> str:
    header = [
        "# Generated by deploy/render.py (deploy/render_mesh.py) — do not edit.",
        f"# Source: the usage filters of {source_name}. Regenerate with `python deploy/render.py`.",
        *(f"# {line}" for line in about),
    ]
    body = yaml.safe_dump(dict(document), sort_keys=False, default_flow_style=False, width=100)
    return "\n".join(header) + "\n" + body


def rendered(
    http_filters: Iterable[Mapping[str, Any]], root: Path, *, source_name: str
) -> dict[Path, str]:
    """Every mesh file's expected text, keyed by its path under `root`, from the source's
    http filters (deploy/render.py reads envoy.yaml and hands them over)."""
    workload, listener, filters = ApiWorkload(), GatewayListener(), list(http_filters)
    return {
        root / ISTIO_OUTPUT: _text(
            istio_envoy_filter(filters, workload),
            source_name,
            [
                "Apply it in the API's namespace, with the same selector as",
                "authorization-policy.yaml and telemetry.yaml (see docs/deploy.md).",
            ],
        ),
        root / GATEWAY_OUTPUT: _text(
            gateway_patch_policy(filters, listener),
            source_name,
            [
                "Needs extensionApis.enableEnvoyPatchPolicy: true in Envoy Gateway's config.",
                f"Patches the listener {listener.xds_name} (namespace/gateway/section) and the",
                f"ext_authz filter of SecurityPolicy {listener.security_policy}; for other names",
                "edit GatewayListener in deploy/render_mesh.py (see docs/deploy.md).",
            ],
        ),
    }
