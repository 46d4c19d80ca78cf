"""The drain rule (docs/deploy.md, "Probes and shutdown"), held for every shipped config.

A replica told to stop (SIGTERM) turns NOT_SERVING and keeps answering for AUTHZ_DRAIN_DELAY_S.
It must keep answering until the last thing routing to it has noticed:

- behind Envoy's health checks, within the worst case `envoy_notices_within` derives from the
  `authz` cluster's health check; the default drain outlasts it by one more check interval;
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
    """Worst case from NOT_SERVING to out of rotation, as Envoy's health checker behaves.

    Envoy re-arms `interval` only after each answer (or `timeout`), and ejects a host on its
    first NOT_SERVING answer: `unhealthy_threshold` counts only timeouts and connection errors.
    A check in flight at the flip may still come back SERVING (up to `timeout`); after one
    `interval` the next one either gets NOT_SERVING (up to `timeout`), or, from a replica too
    busy to answer in time, times out, and `unhealthy_threshold` such timeouts in a row, each
    after an `interval`, eject it.
    """
    interval, timeout = seconds(check["interval"]), seconds(check["timeout"])
    answering = timeout + interval + timeout
    too_busy_to_answer = timeout + int(check["unhealthy_threshold"]) * (interval + timeout)
    return max(answering, too_busy_to_answer)


def probe_notices_within(probe: Manifest) -> float:
    return float(probe["periodSeconds"] * probe["failureThreshold"])


def drain_and_grace(pod_container: Manifest) -> tuple[float, float]:
    env = env_of(pod_container)
    return float(env["AUTHZ_DRAIN_DELAY_S"]["value"]), float(env["AUTHZ_SHUTDOWN_GRACE_S"]["value"])


@pytest.mark.parametrize("relative", ENVOY_CONFIGS)
def test_the_default_drain_outlasts_envoys_worst_case_notice_by_an_interval(relative: str) -> None:
    """The extra interval is for a machine busy enough to run Envoy's own timers late."""
    check = authz_health_check(relative)
    assert envoy_notices_within(check) + seconds(check["interval"]) <= DEFAULT_DRAIN


def test_the_worst_case_notice_of_the_shipped_health_check() -> None:
    """1 s interval, 0.5 s timeout, 2 timeouts to eject: 0.5 + 2 x 1.5 = 3.5 s (docs/deploy.md);
    a replica that answers NOT_SERVING is out within 0.5 + 1 + 0.5 = 2 s."""
    assert envoy_notices_within(authz_health_check("envoy.yaml")) == 3.5


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
