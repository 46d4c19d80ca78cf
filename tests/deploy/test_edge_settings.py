"""Every shipped Envoy config carries every item of Envoy's edge-proxy best practices.

The page ("Configuring Envoy as an edge proxy") lists what an internet-facing Envoy must set;
each item is checked in each file separately, so a copy edited by hand (or a render that
dropped a field) fails here, naming the file and the setting.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.conftest import REPO, load_yaml
from tests.deploy.test_envoy_configs import ENVOY_CONFIGS

HCM = "envoy.filters.network.http_connection_manager"
EXT_AUTHZ = "envoy.filters.http.ext_authz"


def listeners(config: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = config["static_resources"]["listeners"]
    return found


def managers(config: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        f["typed_config"]
        for listener in listeners(config)
        for chain in listener["filter_chains"]
        for f in chain["filters"]
        if f["name"] == HCM
    ]


def monitors(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m["typed_config"] for m in config["overload_manager"]["resource_monitors"]}


def runtime(config: dict[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for layer in config["layered_runtime"]["layers"]:
        merged.update(layer.get("static_layer") or {})
    return merged


def seconds(duration: str) -> float:
    assert duration.endswith("s"), duration
    return float(duration[:-1])


def overload_manager(config: dict[str, Any]) -> None:
    heap = monitors(config)["envoy.resource_monitors.fixed_heap"]
    assert heap["max_heap_size_bytes"] > 0
    actions = {a["name"] for a in config["overload_manager"]["actions"]}
    assert {
        "envoy.overload_actions.shrink_heap",
        "envoy.overload_actions.stop_accepting_requests",
    } <= actions


def global_connection_limit(config: dict[str, Any]) -> None:
    limit = monitors(config)["envoy.resource_monitors.global_downstream_max_connections"]
    assert limit["max_active_downstream_connections"] > 0


def listener_connection_limits(config: dict[str, Any]) -> None:
    values = runtime(config)
    global_limit = monitors(config)["envoy.resource_monitors.global_downstream_max_connections"]
    for listener in listeners(config):
        key = f"envoy.resource_limits.listener.{listener['name']}.connection_limit"
        assert 0 < values[key] < global_limit["max_active_downstream_connections"], key


def listener_buffer_limits(config: dict[str, Any]) -> None:
    for listener in listeners(config):
        # Large enough for ext_authz's 64 KiB body sample, bounded all the same.
        assert 65536 < listener["per_connection_buffer_limit_bytes"] <= 1048576


def cluster_buffer_limits(config: dict[str, Any]) -> None:
    for cluster in config["static_resources"]["clusters"]:
        assert 0 < cluster["per_connection_buffer_limit_bytes"] <= 1048576, cluster["name"]


def remote_address_and_loopback_admin(config: dict[str, Any]) -> None:
    for manager in managers(config):
        assert manager["use_remote_address"] is True


def timeouts(config: dict[str, Any]) -> None:
    for manager in managers(config):
        assert seconds(manager["common_http_protocol_options"]["idle_timeout"]) > 0
        assert 0 < seconds(manager["request_headers_timeout"]) <= 30
        assert seconds(manager["request_timeout"]) > 0
        # Slow tokens: a stream may stay silent for as long as the upstream route allows.
        routes = [r for vh in manager["route_config"]["virtual_hosts"] for r in vh["routes"]]
        upstream = next(r for r in routes if r.get("route", {}).get("cluster") == "upstream")
        assert seconds(manager["stream_idle_timeout"]) >= seconds(upstream["route"]["timeout"])


def http2_limits(config: dict[str, Any]) -> None:
    for manager in managers(config):
        assert manager["http2_protocol_options"] == {
            "max_concurrent_streams": 100,
            "initial_stream_window_size": 65536,
            "initial_connection_window_size": 1048576,
        }


def underscores_rejected(config: dict[str, Any]) -> None:
    for manager in managers(config):
        options = manager["common_http_protocol_options"]
        assert options["headers_with_underscores_action"] == "REJECT_REQUEST"


def path_normalization(config: dict[str, Any]) -> None:
    for manager in managers(config):
        assert manager["normalize_path"] is True
        assert manager["merge_slashes"] is True
        assert manager["path_with_escaped_slashes_action"] in {
            "UNESCAPE_AND_REDIRECT",
            "REJECT_REQUEST",
        }


def authz_sized_for_bursts(config: dict[str, Any]) -> None:
    """The authz breakers never trip before the listener's own connection limit does."""
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    (threshold,) = clusters["authz"]["circuit_breakers"]["thresholds"]
    admitted = max(
        runtime(config)[f"envoy.resource_limits.listener.{listener['name']}.connection_limit"]
        for listener in listeners(config)
    )
    assert threshold["max_requests"] > admitted
    assert threshold["max_pending_requests"] > admitted
    options = clusters["authz"]["typed_extension_protocol_options"]
    http2 = next(iter(options.values()))["explicit_http_config"]["http2_protocol_options"]
    assert http2["initial_stream_window_size"] > 65536  # a whole 64 KiB body sample at once
    assert http2["max_concurrent_streams"] > 0


# A burst the e2e test sends (tests/e2e/test_edge_burst.py) and a generous size for one
# access-log entry (~870 bytes measured with the shipped metadata), and gRPC's default largest
# message, which the sidecar keeps.
BURST_ENTRIES = 2000
ENTRY_BYTES = 1000
GRPC_MAX_MESSAGE = 4 * 1024 * 1024


def access_log_sized_for_bursts(config: dict[str, Any]) -> None:
    """Usage is never dropped in a burst: the access-log stream has its own connections to the
    sidecar (never queued behind Checks), and Envoy can hold a whole burst of entries."""
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    for manager in managers(config):
        (authz,) = [f for f in manager["http_filters"] if f["name"] == EXT_AUTHZ]
        check_cluster = authz["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"]
        for access_log in manager["access_log"]:
            common = access_log["typed_config"]["common_config"]
            cluster = clusters[common["grpc_service"]["envoy_grpc"]["cluster_name"]]
            assert cluster["name"] != check_cluster
            endpoints = clusters[check_cluster]["load_assignment"]["endpoints"]
            assert cluster["load_assignment"]["endpoints"] == endpoints, "the Checks' sidecar"
            held = common["buffer_size_bytes"] + cluster["per_connection_buffer_limit_bytes"]
            assert held >= BURST_ENTRIES * ENTRY_BYTES
            assert common["buffer_size_bytes"] < GRPC_MAX_MESSAGE  # one batch is one message


EDGE_ITEMS: dict[str, Callable[[dict[str, Any]], None]] = {
    "overload manager": overload_manager,
    "global downstream connection limit": global_connection_limit,
    "listener connection limits": listener_connection_limits,
    "listener buffer limits": listener_buffer_limits,
    "cluster buffer limits": cluster_buffer_limits,
    "use_remote_address": remote_address_and_loopback_admin,
    "connection and stream timeouts": timeouts,
    "HTTP/2 limits": http2_limits,
    "headers_with_underscores_action": underscores_rejected,
    "path normalization": path_normalization,
    "authz cluster sized for bursts": authz_sized_for_bursts,
    "access log on its own cluster, sized for bursts": access_log_sized_for_bursts,
}


@pytest.mark.parametrize("item", EDGE_ITEMS)
@pytest.mark.parametrize("relative", ENVOY_CONFIGS)
def test_every_edge_item_is_set_in_every_shipped_config(relative: str, item: str) -> None:
    EDGE_ITEMS[item](load_yaml(REPO / relative))


def test_a_config_without_an_edge_item_fails_the_check() -> None:
    """Negative control: each check notices its setting gone."""
    for check in EDGE_ITEMS.values():
        config = load_yaml(REPO / "envoy.yaml")
        config.pop("overload_manager")
        config.pop("layered_runtime")
        for listener in listeners(config):
            listener.pop("per_connection_buffer_limit_bytes")
        for cluster in config["static_resources"]["clusters"]:
            cluster.pop("per_connection_buffer_limit_bytes")
            cluster.pop("circuit_breakers", None)
        for manager in managers(config):
            for key in ("use_remote_address", "normalize_path", "common_http_protocol_options",
                        "http2_protocol_options", "request_headers_timeout"):  # fmt: skip
                manager.pop(key)
        with pytest.raises((AssertionError, KeyError)):
            check(config)


EXPLAINED = (
    "overload_manager", "max_active_downstream_connections", "layered_runtime",
    "per_connection_buffer_limit_bytes", "normalize_path", "path_with_escaped_slashes_action",
    "idle_timeout", "headers_with_underscores_action", "request_headers_timeout",
    "stream_idle_timeout", "http2_protocol_options", "circuit_breakers", "buffer_size_bytes",
)  # fmt: skip


def test_each_edge_setting_in_the_source_says_why() -> None:
    """The source is commented; a setting with no comment just above it has lost its reason."""
    lines = (REPO / "envoy.yaml").read_text(encoding="utf-8").splitlines()
    for key in EXPLAINED:
        at = [i for i, line in enumerate(lines) if line.strip().startswith(f"{key}:")]
        assert at, f"{key} is not in envoy.yaml"
        for i in at:
            above = [line.strip() for line in lines[max(0, i - 4) : i]]
            assert any(line.startswith("#") for line in above), f"{key} (line {i + 1}) has no why"


def test_envoy_yaml_is_one_of_the_checked_files() -> None:
    assert Path("envoy.yaml") in {Path(p) for p in ENVOY_CONFIGS}


# Deny by default: the routes on which ext_authz is off, and why each is safe. The key API is
# served by the sidecar itself (JWT sign-in); unknown /keys/v1/ paths are answered by Envoy.
EXT_AUTHZ_EXEMPT = {
    "/tokenfactory.keys.v1.KeyService/": "routed to the sidecar, which checks the caller's JWT",
    "/tokenfactory.console.v1.ConsoleService/": "the same: the sidecar checks the caller's JWT",
    "/keys/v1/": "direct 404, nothing is forwarded",
    "/console": "routed to the members' console, which signs members in itself",
}


def ext_authz_disabled(route: dict[str, Any]) -> bool:
    per_filter = route.get("typed_per_filter_config") or {}
    return bool((per_filter.get("envoy.filters.http.ext_authz") or {}).get("disabled"))


@pytest.mark.parametrize("relative", ENVOY_CONFIGS)
def test_every_route_to_the_upstream_asks_the_authorizer(relative: str) -> None:
    for manager in managers(load_yaml(REPO / relative)):
        names = [f["name"] for f in manager["http_filters"]]
        assert "envoy.filters.http.ext_authz" in names
        for vhost in manager["route_config"]["virtual_hosts"]:
            exempt = {}
            for route in vhost["routes"]:
                if ext_authz_disabled(route):
                    match = route["match"]
                    exempt[match.get("prefix") or match["path_separated_prefix"]] = route
                    # An exempt route never reaches the API.
                    assert "direct_response" in route or route["route"]["cluster"] in {
                        "authz",
                        "console",
                    }
                else:
                    assert route.get("route", {}).get("cluster") in {"upstream", None}
            assert set(exempt) == set(EXT_AUTHZ_EXEMPT), relative
            # The catch-all is last and authorized: every other path goes through ext_authz.
            last = vhost["routes"][-1]
            assert last["match"] == {"prefix": "/"}
            assert not ext_authz_disabled(last)
