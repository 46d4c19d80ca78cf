"""Check spans (authz/tracing.py) through the real gRPC server, recorded in memory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from authz.keys import generate_key
from authz.settings import SettingsError
from authz.tracing import Tracing
from tests.support.checks import bearer, check_request
from tests.support.fakes import workspace
from tests.unit.conftest import Sidecar, start_sidecar

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@dataclass
class Traced:
    sidecar: Sidecar
    spans: InMemorySpanExporter

    def finished(self) -> list[ReadableSpan]:
        spans = list(self.spans.get_finished_spans())
        self.spans.clear()
        return spans

    async def finished_with(self, name: str) -> list[ReadableSpan]:
        """The finished spans once `name` is among them. A Check that aborts sends its status
        before the servicer's span is ended, so the client can see the error first."""
        for _ in range(500):  # a generous ceiling (5 s); the event normally comes at once
            if any(span.name == name for span in self.spans.get_finished_spans()):
                break
            await asyncio.sleep(0.01)
        return self.finished()


@pytest.fixture
async def traced() -> AsyncIterator[Traced]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider)
    sidecar, started = await start_sidecar(tracing=tracing)
    yield Traced(sidecar, exporter)
    await started.stop()
    await tracing.shutdown()


def _by_name(spans: list[ReadableSpan]) -> dict[str, ReadableSpan]:
    return {span.name: span for span in spans}


async def test_one_span_per_check_continues_the_callers_trace(traced: Traced) -> None:
    key = generate_key()
    grant = traced.sidecar.store.add(key, workspace("ws_traced", rpm=1))
    headers = {**bearer(key), "traceparent": TRACEPARENT}

    await traced.sidecar.stub.Check(check_request(headers=headers))
    spans = _by_name(traced.finished())
    assert set(spans) == {"ext_authz Check", "store lookup_key", "ratelimit acquire"}
    check = spans["ext_authz Check"]
    assert check.kind is SpanKind.SERVER
    assert check.context is not None
    assert check.parent is not None
    assert f"{check.context.trace_id:032x}" == TRACE_ID
    assert f"{check.parent.span_id:016x}" == PARENT_ID
    assert dict(check.attributes or {}) == {
        "authz.decision": "allow",
        "authz.workspace_id": "ws_traced",
        "authz.key_id": grant.key_id,
        "authz.key_cache": "miss",
    }
    for name in ("store lookup_key", "ratelimit acquire"):
        child = spans[name]
        assert child.kind is SpanKind.CLIENT
        assert child.parent is not None
        assert child.parent.span_id == check.context.span_id

    # Cached now, and over the workspace's RPM: no database call, a deny code.
    await traced.sidecar.stub.Check(check_request(headers=headers))
    spans = _by_name(traced.finished())
    assert set(spans) == {"ext_authz Check", "ratelimit acquire"}
    assert dict(spans["ext_authz Check"].attributes or {}) == {
        "authz.decision": "deny",
        "authz.deny_code": "rate_limit_exceeded",
        "authz.workspace_id": "ws_traced",
        "authz.key_id": grant.key_id,
        "authz.key_cache": "hit",
    }


async def test_spans_never_hold_the_key_and_errors_are_marked(traced: Traced) -> None:
    key = generate_key()
    await traced.sidecar.stub.Check(check_request(headers=bearer(key)))
    spans = _by_name(traced.finished())
    assert set(spans) == {"ext_authz Check", "store lookup_key"}
    unknown = spans["ext_authz Check"]
    assert dict(unknown.attributes or {}) == {
        "authz.decision": "deny",
        "authz.deny_code": "invalid_api_key",
        "authz.key_cache": "miss",
    }
    assert not any(key in span.to_json() for span in spans.values())
    # No traceparent: a new trace, rooted here.
    assert unknown.parent is None

    traced.sidecar.store.down = True
    with pytest.raises(Exception, match="UNAVAILABLE"):
        await traced.sidecar.stub.Check(check_request(headers=bearer(generate_key())))
    spans = _by_name(await traced.finished_with("ext_authz Check"))
    assert spans["ext_authz Check"].attributes is not None
    assert spans["ext_authz Check"].attributes["authz.decision"] == "error"
    assert spans["ext_authz Check"].status.status_code is StatusCode.ERROR
    assert spans["store lookup_key"].status.status_code is StatusCode.ERROR


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": ""},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "true"},
    ],
)
def test_off_unless_an_endpoint_is_set(environ: dict[str, str]) -> None:
    tracing = Tracing.from_environment(environ)
    assert not tracing.enabled
    assert tracing.check is None  # the Check path then creates no span at all


async def test_an_endpoint_turns_it_on() -> None:
    tracing = Tracing.from_environment({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert tracing.enabled
    assert tracing.check is not None
    await tracing.shutdown()


def test_a_bad_endpoint_names_the_variable() -> None:
    with pytest.raises(SettingsError, match="OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        Tracing.from_environment({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "collector:4318"})
