"""OpenTelemetry traces of the Check path, exported over OTLP (http/protobuf).

Off unless `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set; the
SDK reads the other standard `OTEL_*` variables itself (service name, resource attributes,
sampler, exporter headers and timeout, batch sizes). Off, the Check path holds `None` instead
of a `CheckTracing` and creates no span object at all.

On, each Check is one server span continuing the request's `traceparent` (the client's, as
Envoy passes the request headers in the CheckRequest), with child spans around the calls that
leave the process: the key lookup in the database and the rate limiter's step. Spans are
exported from the SDK's batch thread, never on the request path. No global tracer provider is
installed: the composition root owns this one and shuts it down (flushing) on stop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from urllib.parse import urlsplit

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, Tracer, get_current_span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from authz.decision import Allow, Outcome
from authz.settings import SettingsError

SERVICE_NAME = "oais-authz"
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
_PROPAGATOR = TraceContextTextMapPropagator()
_NO_SPAN: AbstractContextManager[None] = contextlib.nullcontext()
"""Entered instead of a span when tracing is off: one shared object, nothing allocated."""

WORKSPACE = "authz.workspace_id"
KEY = "authz.key_id"
DECISION = "authz.decision"
DENY_CODE = "authz.deny_code"
SHADOW_DENY = "authz.shadow_deny_code"
CACHE = "authz.key_cache"


class CheckTracing:
    """Spans for the Check path. Exists only while tracing is on."""

    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer

    @contextlib.contextmanager
    def check(self, headers: Mapping[str, str]) -> Iterator[Span]:
        """The Check's span, a child of the request's `traceparent` when it has one."""
        parent = _PROPAGATOR.extract(headers)
        with self._tracer.start_as_current_span(
            "ext_authz Check", context=parent, kind=SpanKind.SERVER
        ) as span:
            try:
                yield span
            except BaseException:
                # Errors answer UNAVAILABLE (Envoy's status_on_error); the SDK records them.
                span.set_attribute(DECISION, "error")
                raise

    def call(self, name: str) -> AbstractContextManager[Span]:
        """A child span around one call that leaves the process (database, Redis)."""
        return self._tracer.start_as_current_span(name, kind=SpanKind.CLIENT)

    @staticmethod
    def outcome(outcome: Outcome) -> None:
        """Who asked and what they got, on the current Check span (never the key itself)."""
        span = get_current_span()
        if isinstance(outcome, Allow):
            span.set_attributes(
                {
                    DECISION: "allow",
                    WORKSPACE: outcome.workspace.id,
                    KEY: outcome.grant.key_id,
                }
            )
            if outcome.shadow_denial is not None:
                span.set_attribute(SHADOW_DENY, outcome.shadow_denial.code)
            return
        span.set_attributes({DECISION: "deny", DENY_CODE: outcome.code})
        if outcome.workspace_id is not None:
            span.set_attribute(WORKSPACE, outcome.workspace_id)
        if outcome.key_id is not None:
            span.set_attribute(KEY, outcome.key_id)

    @staticmethod
    def cache(result: str) -> None:
        """The key cache's answer (hit, negative_hit, miss, stale) on the current span."""
        get_current_span().set_attribute(CACHE, result)


def traced_call(tracing: CheckTracing | None, name: str) -> AbstractContextManager[object]:
    """`tracing.call(name)`, or a shared do-nothing context when tracing is off."""
    return _NO_SPAN if tracing is None else tracing.call(name)


class Tracing:
    """The sidecar's tracer provider, or nothing when tracing is off."""

    def __init__(self, provider: TracerProvider | None = None) -> None:
        self._provider = provider
        self.check: CheckTracing | None = (
            None if provider is None else CheckTracing(provider.get_tracer("authz"))
        )

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> Tracing:
        """On when an OTLP endpoint is configured (and the SDK is not disabled)."""
        configured = [name for name in ENDPOINT_VARIABLES if environ.get(name)]
        if not configured or environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
            return cls()
        for name in configured:
            url = urlsplit(environ[name])
            if url.scheme not in ("http", "https") or not url.netloc:
                raise SettingsError(name, "expected an http:// or https:// URL")
        # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, when set, name the service instead.
        named = "OTEL_SERVICE_NAME" in environ or "service.name=" in environ.get(
            "OTEL_RESOURCE_ATTRIBUTES", ""
        )
        resource = Resource.create({} if named else {"service.name": SERVICE_NAME})
        # Our stop() flushes it; no atexit hook of its own (one owner, no globals).
        provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        return cls(provider)

    @property
    def enabled(self) -> bool:
        return self._provider is not None

    async def shutdown(self) -> None:
        """Export what is still queued, then stop (off the event loop: it may wait on I/O)."""
        if self._provider is not None:
            await asyncio.to_thread(self._provider.shutdown)
