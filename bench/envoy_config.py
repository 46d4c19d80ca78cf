"""One Envoy config with a listener per benchmark setup, derived from the shipped `envoy.yaml`.

Every listener keeps the shipped HTTP connection manager as it is (ext_authz with the body
forwarded and its timeout, the access-log stream back to the sidecar, the usage filters)
with two changes: its ext_authz and access-log calls go to that setup's own cluster (a copy of
the shipped `authz` cluster, health checks included), and every route answers with a fixed
`direct_response`, so no upstream sits in the measurement. The "no authz" listener drops the
access log and swaps ext_authz for a buffer filter with the same body limit. Pure: no
processes, no files written.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "envoy.yaml"
EXT_AUTHZ = "envoy.filters.http.ext_authz"
TRANSCODER = "envoy.filters.http.grpc_json_transcoder"
UPSTREAM_BODY = (
    '{"id":"chatcmpl-bench","object":"chat.completion","model":"gpt-4o-mini",'
    '"choices":[{"index":0,"message":{"role":"assistant","content":"ok"},'
    '"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":1,'
    '"total_tokens":13}}'
)


@dataclass(frozen=True, slots=True)
class ListenerPlan:
    """One listener: its port, and the ext_authz servers behind it (none = Envoy alone)."""

    name: str
    port: int
    authz_ports: Sequence[int]


def _hcm(listener: dict[str, Any]) -> dict[str, Any]:
    typed: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return typed


def _direct_routes() -> dict[str, Any]:
    return {
        "name": "bench",
        "virtual_hosts": [
            {
                "name": "bench",
                "domains": ["*"],
                "routes": [
                    {
                        "match": {"prefix": "/"},
                        "direct_response": {
                            "status": 200,
                            "body": {"inline_string": UPSTREAM_BODY},
                        },
                        "response_headers_to_add": [
                            {
                                "header": {"key": "content-type", "value": "application/json"},
                                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                            }
                        ],
                    }
                ],
            }
        ],
    }


def _authz_cluster(template: dict[str, Any], name: str, ports: Sequence[int]) -> dict[str, Any]:
    cluster = copy.deepcopy(template)
    cluster["name"] = name
    cluster["load_assignment"] = {
        "cluster_name": name,
        "endpoints": [
            {
                "lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                                 "port_value": port}}}}
                    for port in ports
                ]
            }
        ],
    }  # fmt: skip
    return cluster


def _buffer_like(ext_authz: dict[str, Any]) -> dict[str, Any]:
    """A buffer filter reading the body as ext_authz does: without it, Envoy answers before
    the body has arrived and closes the HTTP/1.1 connection, and the baseline measures
    reconnects instead of Envoy."""
    limit = ext_authz["typed_config"]["with_request_body"]["max_request_bytes"]
    return {
        "name": "envoy.filters.http.buffer",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
            "max_request_bytes": limit,
        },
    }


def _listener(template: dict[str, Any], plan: ListenerPlan, cluster: str) -> dict[str, Any]:
    listener = copy.deepcopy(template)
    listener["name"] = plan.name
    listener["address"]["socket_address"]["port_value"] = plan.port
    hcm = _hcm(listener)
    hcm["stat_prefix"] = plan.name
    hcm["route_config"] = _direct_routes()
    filters: list[dict[str, Any]] = []
    for http_filter in hcm["http_filters"]:
        if http_filter["name"] == TRANSCODER:
            continue  # key management only; its routes are gone
        if http_filter["name"] == EXT_AUTHZ:
            if not plan.authz_ports:
                filters.append(_buffer_like(http_filter))
                continue
            http_filter["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] = cluster
        filters.append(http_filter)
    hcm["http_filters"] = filters
    if plan.authz_ports:
        for log in hcm.get("access_log", []):
            log["typed_config"]["common_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] = (
                cluster
            )
    else:
        hcm.pop("access_log", None)
    return listener


def build_config(plans: Sequence[ListenerPlan], *, admin_port: int) -> dict[str, Any]:
    """The shipped config turned into one listener (and one authz cluster) per plan."""
    shipped: dict[str, Any] = yaml.safe_load(SHIPPED.read_text())
    resources = shipped["static_resources"]
    (listener_template,) = resources["listeners"]
    (authz_template,) = [c for c in resources["clusters"] if c["name"] == "authz"]
    listeners, clusters = [], []
    for plan in plans:
        cluster = f"authz_{plan.name}"
        listeners.append(_listener(listener_template, plan, cluster))
        if plan.authz_ports:
            clusters.append(_authz_cluster(authz_template, cluster, plan.authz_ports))
    shipped["admin"]["address"]["socket_address"]["port_value"] = admin_port
    shipped["static_resources"] = {"listeners": listeners, "clusters": clusters}
    return shipped


def ext_authz_config(config: dict[str, Any], listener: str) -> dict[str, Any] | None:
    """The ext_authz filter config of one listener (None when it has none)."""
    for candidate in config["static_resources"]["listeners"]:
        if candidate["name"] == listener:
            for http_filter in _hcm(candidate)["http_filters"]:
                if http_filter["name"] == EXT_AUTHZ:
                    found: dict[str, Any] = http_filter["typed_config"]
                    return found
    return None
