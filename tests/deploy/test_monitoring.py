"""deploy/monitoring: the ServiceMonitor and the PrometheusRule, and what /metrics serves.

Every alert is unit-tested by `promtool test rules` (Debian's `prometheus` package; `make install`
installs it) on the sample series in promtool/rules.test.yaml. Under CI=true a missing promtool
fails the run instead of skipping. Metric and label names come from a live
`Metrics(CollectorRegistry())`, as for the Grafana dashboard.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.conftest import DEPLOY, KUSTOMIZATIONS, Manifest, load_yaml
from tests.deploy.crd import crd_errors
from tests.deploy.test_grafana import METRIC_NAME, exported_labels
from tests.support.stack import start_sidecar

Kustomize = Callable[[str], tuple[Manifest, ...]]
MONITORING = DEPLOY / "monitoring"
UNIT_TESTS = Path(__file__).resolve().parent / "promtool" / "rules.test.yaml"
JOB = "oais-authz"
# Labels Prometheus adds at scrape time (the ServiceMonitor's job, the target's address).
TARGET_LABELS = frozenset({"job", "instance"})
SERIES = re.compile(r"^(\w+)\{(.*)\}$")


@pytest.fixture(scope="session")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing: `make install` (apt-get install prometheus)")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return found


def rule() -> dict[str, Any]:
    loaded: dict[str, Any] = load_yaml(MONITORING / "prometheusrule.yaml")
    return loaded


def alerts(prometheus_rule: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for group in prometheus_rule["spec"]["groups"]:
        yield from group["rules"]


def run_promtool(promtool: str, directory: Path, prometheus_rule: dict[str, Any]) -> str:
    """`promtool check rules` and `promtool test rules` on the rule's groups; their output."""
    (directory / "rules.yaml").write_text(
        yaml.safe_dump({"groups": prometheus_rule["spec"]["groups"]}), encoding="utf-8"
    )
    shutil.copy(UNIT_TESTS, directory / "rules.test.yaml")
    output = ""
    for command in (["check", "rules", "rules.yaml"], ["test", "rules", "rules.test.yaml"]):
        result = subprocess.run(
            [promtool, *command],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=directory,
        )
        output += result.stdout + result.stderr
        if result.returncode != 0:
            raise AssertionError(f"promtool {' '.join(command)} failed:\n{output}")
    return output


def test_objects_validate_against_prometheus_operators_crds() -> None:
    assert crd_errors("prometheusrules.monitoring.coreos.com.v1", rule()) == []
    monitor = load_yaml(MONITORING / "servicemonitor.yaml")
    assert crd_errors("servicemonitors.monitoring.coreos.com.v1", monitor) == []
    broken = copy.deepcopy(monitor)
    broken["spec"]["endpoints"][0]["scrapeInterval"] = "30s"  # it is `interval`
    assert crd_errors("servicemonitors.monitoring.coreos.com.v1", broken)


def test_every_alert_passes_promtool_unit_tests(promtool: str, tmp_path: Path) -> None:
    output = run_promtool(promtool, tmp_path, rule())
    assert "SUCCESS: 7 rules found" in output


def test_promtool_catches_a_wrong_threshold(promtool: str, tmp_path: Path) -> None:
    """Negative control: the unit tests pin each rule's behaviour, not just its syntax."""
    broken = copy.deepcopy(rule())
    for alert in alerts(broken):
        if alert["alert"] == "AuthzCheckErrorRatioHigh":
            alert["expr"] = alert["expr"].replace("> 0.01", "> 0.2")
    with pytest.raises(AssertionError, match="AuthzCheckErrorRatioHigh"):
        run_promtool(promtool, tmp_path, broken)


def test_each_alert_has_a_firing_and_a_quiet_case() -> None:
    names = {alert["alert"] for alert in alerts(rule())}
    assert names == {
        "AuthzSidecarDown",
        "AuthzSidecarNotReady",
        "AuthzCheckErrorRatioHigh",
        "AuthzRedisCircuitOpen",
        "AuthzCheckLatencyP99OverBudget",
        "AuthzWorkspaceQuotaExhausted",
        "AuthzChecksShed",
    }
    cases = [c for t in load_yaml(UNIT_TESTS)["tests"] for c in t["alert_rule_test"]]
    for name in names:
        outcomes = {bool(c["exp_alerts"]) for c in cases if c["alertname"] == name}
        assert outcomes == {True, False}, name


def test_rules_and_samples_use_only_what_the_sidecar_exports() -> None:
    exported = exported_labels()
    for alert in alerts(rule()):
        names = set(METRIC_NAME.findall(alert["expr"]))
        assert names <= exported.keys(), alert["alert"]
        assert f'job="{JOB}"' in alert["expr"], alert["alert"]
    for test in load_yaml(UNIT_TESTS)["tests"]:
        for series in test["input_series"]:
            matched = SERIES.match(series["series"])
            assert matched, series["series"]
            name, labels = matched[1], {p.split("=")[0].strip() for p in matched[2].split(",")}
            if name == "up":
                assert labels == TARGET_LABELS
                continue
            assert labels <= exported[name] | TARGET_LABELS, series["series"]


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_service_monitor_selects_every_metrics_port(kustomize: Kustomize, directory: str) -> None:
    monitor = load_yaml(MONITORING / "servicemonitor.yaml")["spec"]
    ports = {endpoint["port"] for endpoint in monitor["endpoints"]}
    services = [
        m
        for m in kustomize(directory)
        if m["kind"] == "Service"
        and monitor["selector"]["matchLabels"].items() <= m["metadata"]["labels"].items()
    ]
    scraped = [p for s in services for p in s["spec"]["ports"] if p["name"] in ports]
    assert [p["port"] for p in scraped] == [9464], directory
    assert all(s["metadata"]["labels"][monitor["jobLabel"]] == JOB for s in services)


def test_metrics_serves_process_and_python_metrics(tmp_path: Path) -> None:
    """A real `authz serve`, scraped over HTTP: the standard process and Python series are
    there next to ours (the registry is our own, so they are not there by default)."""
    sidecar = start_sidecar(tmp_path, database_url=f"sqlite:///{tmp_path / 'authz.db'}")
    try:
        families = {f.name: f for f in text_string_to_metric_families(sidecar.metrics())}
    finally:
        sidecar.process.stop()
    assert families["process_resident_memory_bytes"].samples[0].value > 0
    assert families["process_cpu_seconds"].type == "counter"
    assert families["process_open_fds"].samples[0].value > 0
    (info,) = families["python_info"].samples
    assert info.labels["implementation"] == "CPython"
    assert "python_gc_collections" in families
    assert "authz_checks" in families
