"""The benchmark's Envoy config keeps the shipped ext_authz filter, per listener."""

from __future__ import annotations

from typing import Any

import yaml

from bench.envoy_config import SHIPPED, ListenerPlan, build_config, ext_authz_config


def _shipped_ext_authz() -> dict[str, Any]:
    shipped = yaml.safe_load(SHIPPED.read_text())
    hcm = shipped["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    (found,) = [
        f["typed_config"]
        for f in hcm["typed_config"]["http_filters"]
        if f["name"] == "envoy.filters.http.ext_authz"
    ]
    return dict(found)


def _hcm(config: dict[str, Any], listener: str) -> dict[str, Any]:
    (found,) = [x for x in config["static_resources"]["listeners"] if x["name"] == listener]
    return dict(found["filter_chains"][0]["filters"][0]["typed_config"])


def test_each_setup_gets_the_shipped_filter_pointed_at_its_own_cluster() -> None:
    config = build_config(
        [ListenerPlan("a", 1001, []), ListenerPlan("b", 1002, [2001]),
         ListenerPlan("e", 1005, [2005, 2006])],
        admin_port=1000,
    )  # fmt: skip

    shipped = _shipped_ext_authz()
    for name in ("b", "e"):
        filter_config = ext_authz_config(config, name)
        assert filter_config is not None
        assert filter_config["with_request_body"] == shipped["with_request_body"]
        assert filter_config["grpc_service"]["timeout"] == shipped["grpc_service"]["timeout"]
        assert filter_config["grpc_service"]["envoy_grpc"]["cluster_name"] == f"authz_{name}"
        (log,) = _hcm(config, name)["access_log"]
        assert log["typed_config"]["common_config"]["grpc_service"]["envoy_grpc"] == {
            "cluster_name": f"authz_{name}"
        }
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    assert set(clusters) == {"authz_b", "authz_e"}
    endpoints = clusters["authz_e"]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["socket_address"]["port_value"] for e in endpoints] == [
        2005,
        2006,
    ]
    assert "health_checks" in clusters["authz_b"]


def test_the_no_authz_listener_buffers_the_body_and_logs_nothing() -> None:
    config = build_config([ListenerPlan("a", 1001, [])], admin_port=1000)

    hcm = _hcm(config, "a")
    names = [f["name"] for f in hcm["http_filters"]]
    assert ext_authz_config(config, "a") is None
    assert "envoy.filters.http.buffer" in names
    assert "access_log" not in hcm
    route = hcm["route_config"]["virtual_hosts"][0]["routes"][0]
    assert route["direct_response"]["status"] == 200
