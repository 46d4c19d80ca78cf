"""Per-workspace metrics of one batch of usage events, summed before they reach Prometheus.

A message from Envoy holds many entries, mostly of a few workspaces: each labelled child moves
once per batch instead of several times per entry, and is looked up once per process. The
totals are the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import Counter, Histogram

from authz.metrics import Metrics
from authz.usage.events import UsageEvent
from authz.usage.pricing import UNITS_PER_MICRO

_USD_UNITS = UNITS_PER_MICRO * 10**6


@dataclass(slots=True)
class _Sums:
    status_classes: dict[str, int] = field(default_factory=dict)
    prompt: int = 0
    completion: int = 0
    estimated: int = 0
    spend_units: int = 0
    upstream_seconds: list[float] = field(default_factory=list)


@dataclass(slots=True)
class _Children:
    """One workspace label's metric children, looked up once: Prometheus never drops them."""

    requests: dict[str, Counter]
    tokens: dict[str, Counter]
    spend: Counter
    latency: Histogram


class WorkspaceTotals:
    """Collects `add`ed events, then moves the workspace metrics once per label (`publish`)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._sums: dict[str, _Sums] = {}
        self._children: dict[str, _Children] = {}

    def add(self, event: UsageEvent, spend_units: int, estimated_tokens: int) -> None:
        label = self._metrics.workspace(event.workspace_id)
        sums = self._sums.get(label)
        if sums is None:
            sums = self._sums[label] = _Sums()
        status = event.status
        status_class = f"{status // 100}xx" if status else "none"
        sums.status_classes[status_class] = sums.status_classes.get(status_class, 0) + 1
        sums.prompt += event.prompt_tokens or 0
        sums.completion += event.completion_tokens or 0
        sums.estimated += estimated_tokens
        sums.spend_units += spend_units
        if event.upstream_seconds is not None:
            sums.upstream_seconds.append(event.upstream_seconds)

    def publish(self) -> None:
        for label, sums in self._sums.items():
            children = self._children.get(label) or self._children_of(label)
            for status_class, count in sums.status_classes.items():
                _child(
                    children.requests, self._metrics.workspace_requests, label, status_class
                ).inc(count)
            for kind, tokens in (
                ("prompt", sums.prompt),
                ("completion", sums.completion),
                ("estimated", sums.estimated),
            ):
                if tokens:
                    _child(children.tokens, self._metrics.workspace_tokens, label, kind).inc(tokens)
            if sums.spend_units:
                children.spend.inc(sums.spend_units / _USD_UNITS)
            for seconds in sums.upstream_seconds:
                children.latency.observe(seconds)
        self._sums = {}

    def _children_of(self, label: str) -> _Children:
        metrics = self._metrics
        children = self._children[label] = _Children(
            requests={},
            tokens={},
            spend=metrics.workspace_spend.labels(label),
            latency=metrics.workspace_upstream_latency.labels(label),
        )
        return children


def _child(known: dict[str, Counter], counter: Counter, label: str, value: str) -> Counter:
    """The child of `counter` for (label, value), created on first use as `labels` does."""
    child = known.get(value)
    if child is None:
        child = known[value] = counter.labels(label, value)
    return child
