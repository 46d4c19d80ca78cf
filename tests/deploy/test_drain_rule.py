"""The drain rule (docs/deploy.md, "Probes and shutdown"), held for every shipped config.

A replica told to stop (SIGTERM) turns NOT_SERVING and keeps answering for AUTHZ_DRAIN_DELAY_S.
It must keep answering until the last thing routing to it has noticed:

- behind Envoy's health checks, within `interval x unhealthy_threshold + timeout`; the default
  drain is twice that;
- in the Kubernetes pod, Envoy (whose only `authz` host is this sidecar) keeps sending Checks
  until its preStop ends: the drain is that preStop plus the default drain;
- under Istio, callers drop the pod once its readiness probe fails: the drain is
  `periodSeconds x failureThreshold` plus the default drain.

Then in-flight Checks get AUTHZ_SHUTDOWN_GRACE_S, and everything ends before SIGKILL.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import yaml

from authz.settings import Settings
from tests.deploy.conftest import K8S_OVERLAYS, REPO, Manifest, container, env_of, load_yaml, only
from tests.deploy.test_envoy_configs import ENVOY_CONFIGS

Kustomize = Callable[[str], tuple[Manifest, ...]]
DEFAULT_DRAIN = Settings().drain_delay_s


def seconds(duration: str) -> float:
    return float(duration.removesuffix("s"))


def authz_health_check(relative: str) -> dict[str, Any]:
    clusters = load_yaml(REPO / relative)["static_resources"]["clusters"]
    (check,) = next(c for c in clusters if c["name"] == "authz")["health_checks"]
    found: dict[str, Any] = check
    return found


def envoy_notices_within(check: dict[str, Any]) -> float:
    """Worst case from NOT_SERVING to out of rotation: the next check is up to one interval
    away, and `unhealthy_threshold` of them must fail, each taking up to `timeout`."""
    threshold = int(check["unhealthy_threshold"])
    return seconds(check["interval"]) * threshold + seconds(check["timeout"])


def probe_notices_within(probe: Manifest) -> float:
    return float(probe["periodSeconds"] * probe["failureThreshold"])


def drain_and_grace(pod_container: Manifest) -> tuple[float, float]:
    env = env_of(pod_container)
    return float(env["AUTHZ_DRAIN_DELAY_S"]["value"]), float(env["AUTHZ_SHUTDOWN_GRACE_S"]["value"])


@pytest.mark.parametrize("relative", ENVOY_CONFIGS)
def test_the_default_drain_is_twice_what_envoy_needs_to_notice(relative: str) -> None:
    assert 2 * envoy_notices_within(authz_health_check(relative)) <= DEFAULT_DRAIN


@pytest.mark.parametrize("relative", ENVOY_CONFIGS)
def test_a_returning_replica_gets_traffic_on_its_first_good_answer(relative: str) -> None:
    """Issue 11: one failed first check used to keep a replica out for Envoy's 60 s default."""
    check = authz_health_check(relative)
    assert check["healthy_threshold"] == 1
    assert seconds(check["no_traffic_interval"]) <= seconds(check["interval"])
    assert seconds(check["unhealthy_interval"]) <= seconds(check["interval"])


@pytest.mark.parametrize("overlay", K8S_OVERLAYS)
def test_the_sidecar_pod_follows_the_rule(kustomize: Kustomize, overlay: str) -> None:
    pod = only(kustomize(overlay), "Deployment", "authz-gateway")["spec"]["template"]["spec"]
    envoy = container(pod, "envoy")
    pre_stop = envoy["lifecycle"]["preStop"]["sleep"]["seconds"]
    # Envoy keeps serving until the pod's endpoint is gone everywhere.
    assert pre_stop >= probe_notices_within(envoy["readinessProbe"])
    drain, grace = drain_and_grace(container(pod, "authz"))
    assert drain >= pre_stop + DEFAULT_DRAIN
    assert drain + grace < pod["terminationGracePeriodSeconds"]


def test_the_istio_authorizer_follows_the_rule(kustomize: Kustomize) -> None:
    deployment = only(kustomize("deploy/istio"), "Deployment", "authz")
    template = deployment["spec"]["template"]
    authz = container(template["spec"], "authz")
    drain, grace = drain_and_grace(authz)
    assert drain >= probe_notices_within(authz["readinessProbe"]) + DEFAULT_DRAIN
    proxy = load_yaml_text(template["metadata"]["annotations"]["proxy.istio.io/config"])
    # The pod's own Istio proxy carries the Checks until the sidecar is done.
    assert seconds(proxy["terminationDrainDuration"]) >= drain + grace
    assert drain + grace < template["spec"]["terminationGracePeriodSeconds"]


def load_yaml_text(text: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(text)
    return loaded


def test_compose_lets_the_default_drain_finish_before_sigkill() -> None:
    authz = load_yaml(REPO / "deploy/compose.yaml")["services"]["authz"]
    env = authz.get("environment") or {}
    assert "AUTHZ_DRAIN_DELAY_S" not in env  # the default, derived from the health checks
    defaults = Settings()
    assert defaults.drain_delay_s + defaults.shutdown_grace_s < seconds(authz["stop_grace_period"])
