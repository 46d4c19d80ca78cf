"""deploy/grafana: the dashboard is well formed and queries only what the sidecar exports.

Metric names come from a live `Metrics(CollectorRegistry())`, so a renamed or removed metric
fails here instead of leaving an empty panel. Queries are parsed with `promql-parser` (Python
bindings of GreptimeDB's Rust PromQL parser) when it is installed.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterator
from functools import cache
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from authz.metrics import Metrics
from tests.deploy.conftest import DEPLOY, load_yaml

if TYPE_CHECKING:
    import promql_parser

GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "authz-dashboard.json"
PROVISIONING = GRAFANA / "provisioning" / "dashboards.yaml"

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
WORKSPACE_QUERY = "label_values(authz_workspace_requests_total, workspace)"
WORKSPACE_MATCHER = 'workspace=~"$workspace"'
WORKSPACE_ROW_PREFIX = "Workspaces"
GRID_COLUMNS = 24

# Series names prometheus_client derives from one metric family, by type.
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
}
# Labels Prometheus adds at scrape time, and the bucket bound of histograms.
TARGET_LABELS = frozenset({"instance", "job"})

# What the dashboard must show, whatever else it shows.
REQUIRED_METRICS = frozenset(
    {
        "authz_workspace_tokens_total",
        "authz_workspace_spend_usd_total",
        "authz_workspace_upstream_duration_seconds_bucket",
        "authz_workspace_requests_total",
        "authz_workspace_denials_total",
        "authz_checks_total",
        "authz_check_duration_seconds_bucket",
        "authz_key_cache_lookups_total",
        "authz_store_errors_total",
        "authz_ratelimit_redis_seconds_bucket",
        "authz_ratelimit_redis_errors_total",
        "authz_ratelimit_circuit_state",
        "authz_fail_open_admissions_total",
        "authz_ready",
        "authz_usage_reconciliations_total",
        "authz_ledger_flushes_total",
    }
)

METRIC_NAME = re.compile(r"\bauthz_\w+")
SELECTOR = re.compile(r"\b(authz_\w+)\s*(\{[^}]*\})?")
# Grafana substitutes these before Prometheus sees the query; the parser needs a duration.
GRAFANA_DURATION = re.compile(r"\$\{?__(?:rate_interval|interval|range)\}?")

HAS_PROMQL_PARSER = importlib.util.find_spec("promql_parser") is not None

Panel = dict[str, Any]
Node = TypeVar("Node")


@cache
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def panels() -> Iterator[Panel]:
    """Every panel, including those inside collapsed rows."""
    for panel in dashboard()["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queries() -> list[tuple[str, str]]:
    """(panel title and refId, expr) for every query of every panel."""
    return [
        (f"{panel['title']} [{target['refId']}]", target["expr"])
        for panel in panels()
        for target in panel.get("targets", [])
    ]


def query_params() -> list[Any]:
    """`queries()` as pytest parameters named after the panel."""
    return [pytest.param(where, expr, id=where) for where, expr in queries()]


def variable(name: str) -> dict[str, Any]:
    found = [v for v in dashboard()["templating"]["list"] if v["name"] == name]
    assert len(found) == 1, f"expected one template variable {name!r}"
    result: dict[str, Any] = found[0]
    return result


@cache
def exported_labels() -> dict[str, frozenset[str]]:
    """Every series name the sidecar exports, with the labels it can carry."""
    metrics = Metrics(CollectorRegistry())
    labels_by_family = _labels_by_family(metrics)
    exported: dict[str, frozenset[str]] = {}
    for family in metrics.registry.collect():
        assert family.type in SUFFIXES, f"{family.name}: unexpected type {family.type}"
        sampled = frozenset(k for sample in family.samples for k in sample.labels)  # process_*
        labels = labels_by_family.get(family.name, sampled) | TARGET_LABELS
        for suffix in SUFFIXES[family.type]:
            exported[family.name + suffix] = labels | {"le"} if suffix == "_bucket" else labels
    return exported


def _labels_by_family(metrics: Metrics) -> dict[str, frozenset[str]]:
    """Label names of the collectors held by `metrics` and by the objects it holds."""
    owners = [
        metrics,
        *(
            v
            for v in vars(metrics).values()
            if hasattr(v, "__dict__") and not isinstance(v, MetricWrapperBase)
        ),
    ]
    # prometheus_client has no public accessor for a collector's label names.
    return {
        collector._name: frozenset(collector._labelnames)
        for owner in owners
        for collector in vars(owner).values()
        if isinstance(collector, MetricWrapperBase)
    }


def test_dashboard_is_a_grafana_dashboard() -> None:
    board = dashboard()
    assert 36 <= board["schemaVersion"] <= 41
    assert board["uid"] == "oais-authz"
    assert board["title"]
    assert board["id"] is None, "an exported dashboard carries no database id"


def test_datasource_is_a_variable() -> None:
    datasource = variable("datasource")
    assert datasource["type"] == "datasource"
    assert datasource["query"] == "prometheus"


def test_workspace_variable_lists_workspaces_with_all() -> None:
    workspace = variable("workspace")
    assert workspace["type"] == "query"
    assert workspace["datasource"] == DATASOURCE
    assert workspace["definition"] == WORKSPACE_QUERY
    assert workspace["query"]["query"] == WORKSPACE_QUERY
    assert workspace["multi"] is True
    assert workspace["includeAll"] is True
    # Multi-select values reach Prometheus as a regex alternation; All must match every one.
    assert workspace["allValue"] == ".*"
    names = set(METRIC_NAME.findall(WORKSPACE_QUERY))
    assert names <= exported_labels().keys()


def test_every_panel_has_an_id_title_datasource_and_position() -> None:
    ids: list[int] = []
    for panel in panels():
        assert isinstance(panel["id"], int)
        ids.append(panel["id"])
        assert isinstance(panel["title"], str), panel
        assert panel["title"], panel
        assert panel["datasource"] == DATASOURCE, panel["title"]
        grid = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= grid.keys(), panel["title"]
        assert all(isinstance(grid[k], int) for k in "hwxy"), panel["title"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["y"] >= 0, panel["title"]
        assert grid["w"] > 0, panel["title"]
        assert grid["h"] > 0, panel["title"]
        assert grid["x"] + grid["w"] <= GRID_COLUMNS, panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"] == DATASOURCE, panel["title"]
            assert target["expr"].strip(), panel["title"]
        ref_ids = [t["refId"] for t in panel.get("targets", [])]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        if panel["type"] != "row":
            assert ref_ids, f"{panel['title']}: no queries"
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_panels_do_not_overlap() -> None:
    boxes = [(p["title"], p["gridPos"]) for p in dashboard()["panels"]]
    for i, (title, a) in enumerate(boxes):
        for other, b in boxes[i + 1 :]:
            apart = (
                a["x"] + a["w"] <= b["x"]
                or b["x"] + b["w"] <= a["x"]
                or a["y"] + a["h"] <= b["y"]
                or b["y"] + b["h"] <= a["y"]
            )
            assert apart, f"{title!r} overlaps {other!r}"


def test_suffixes_follow_prometheus_client() -> None:
    """Counters are only exported with `_total`, histograms only as buckets, sum and count."""
    exported = exported_labels()
    assert "authz_checks_total" in exported
    assert "authz_checks" not in exported
    assert "authz_check_duration_seconds_bucket" in exported
    assert "authz_check_duration_seconds" not in exported
    assert "authz_ready" in exported


@pytest.mark.parametrize(("where", "expr"), query_params())
def test_queries_use_only_exported_metrics(where: str, expr: str) -> None:
    names = set(METRIC_NAME.findall(expr))
    assert names, f"{where}: queries no authz_ metric"
    unknown = names - exported_labels().keys()
    assert not unknown, f"{where}: not exported by the sidecar: {sorted(unknown)}"


def test_dashboard_covers_the_required_metrics() -> None:
    used = {name for _, expr in queries() for name in METRIC_NAME.findall(expr)}
    assert sorted(REQUIRED_METRICS - used) == []


@pytest.mark.parametrize(("where", "expr"), query_params())
def test_workspace_metrics_filter_on_the_variable(where: str, expr: str) -> None:
    exported = exported_labels()
    for name, matchers in SELECTOR.findall(expr):
        if "workspace" in exported.get(name, ()):
            assert WORKSPACE_MATCHER in matchers, f"{where}: {name}{matchers}"


def test_workspace_rows_only_show_workspace_metrics() -> None:
    """Every panel under a "Workspaces" row is filtered by the workspace variable."""
    row = ""
    seen = 0
    for panel in dashboard()["panels"]:
        if panel["type"] == "row":
            row = panel["title"]
            continue
        if not row.startswith(WORKSPACE_ROW_PREFIX):
            continue
        seen += 1
        for target in panel["targets"]:
            assert WORKSPACE_MATCHER in target["expr"], f"{panel['title']} {target['refId']}"
    assert seen >= 5


def nodes(tree: promql_parser.Expr, kind: type[Node]) -> list[Node]:
    """The nodes of a parsed PromQL expression that are instances of `kind`, depth first."""
    import promql_parser

    found: list[Node] = []

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, kind):
            found.append(node)

    promql_parser.walk(tree, pre_visit=visit)
    return found


@pytest.mark.skipif(not HAS_PROMQL_PARSER, reason="pip install promql-parser (dev dependency)")
@pytest.mark.parametrize(("where", "expr"), query_params())
def test_queries_parse_as_promql(where: str, expr: str) -> None:
    """Each query parses; its label matchers and `by` labels exist on the metrics it reads."""
    import promql_parser

    try:
        tree = promql_parser.parse(GRAFANA_DURATION.sub("5m", expr))
    except ValueError as error:
        pytest.fail(f"{where}: {error}\n{expr}")
    exported = exported_labels()
    selectors = nodes(tree, promql_parser.VectorSelector)
    for selector in selectors:
        labels = exported.get(selector.name or "", frozenset())
        for matcher in selector.matchers.matchers:
            assert matcher.name in labels, f"{where}: {selector.name} has no {matcher.name!r}"
    for aggregation in nodes(tree, promql_parser.AggregateExpr):
        modifier = aggregation.modifier
        if modifier is None or modifier.type != promql_parser.AggModifierType.By:
            continue
        for label in modifier.labels:
            lacking = [
                s.name
                for s in nodes(aggregation.expr, promql_parser.VectorSelector)
                if label not in exported.get(s.name or "", ())
            ]
            assert not lacking, f"{where}: by ({label}), which {lacking} do not carry"
    # The regex the other tests rely on sees exactly the metrics the parser sees.
    assert {s.name for s in selectors} == set(METRIC_NAME.findall(expr)), where


@pytest.mark.skipif(not HAS_PROMQL_PARSER, reason="pip install promql-parser (dev dependency)")
def test_parser_rejects_broken_promql() -> None:
    """Negative control: an unbalanced query does not slip through."""
    import promql_parser

    with pytest.raises(ValueError, match="parenthesis"):
        promql_parser.parse("sum(rate(authz_checks_total[5m])")


def test_provisioning_file_loads_dashboards_from_files() -> None:
    config = load_yaml(PROVISIONING)
    assert config["apiVersion"] == 1
    (provider,) = config["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"].startswith("/")
