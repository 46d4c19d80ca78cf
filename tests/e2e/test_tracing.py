"""OpenTelemetry spans behind real Envoy, exported over OTLP/HTTP to a real receiver."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from authz.tracing import SERVICE_NAME
from tests.e2e.conftest import build_stack
from tests.e2e.test_envoy_contract import new_key
from tests.support.otlp import OtlpReceiver, ReceivedSpan, otlp_receiver

pytestmark = pytest.mark.e2e

SERVER, CLIENT = 2, 3  # OTLP's SpanKind values


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with otlp_receiver() as running:
        yield running


def test_check_span_continues_the_clients_trace_and_is_flushed_on_stop(
    tmp_path: Path, receiver: OtlpReceiver
) -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        # Nothing is exported on a timer during the test: what arrives, stop() flushed.
        "OTEL_BSP_SCHEDULE_DELAY": "600000",
        # Envoy's access-log stream stays open: do not let it hold the shutdown for long.
        "AUTHZ_SHUTDOWN_GRACE_S": "0.5",
    }
    stacks = build_stack(tmp_path, f"sqlite:///{tmp_path / 'authz.db'}", env=env)
    stack = next(stacks)
    try:
        workspace_id, key = new_key(stack)
        trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
        headers = {
            "Authorization": f"Bearer {key['secret']}",
            "traceparent": f"00-{trace_id}-{client_span}-01",
        }
        assert stack.request("/v1/models", headers=headers).status == 200
        # SIGTERM: drain, flush, exit 0.
        assert stack.sidecar.process.stop(timeout=30) == 0
    finally:
        next(stacks, None)  # run the fixture's teardown: Envoy and the upstream stop

    def ours(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
        return [s for s in spans if s.trace_id == trace_id]

    spans = ours(receiver.wait_for(lambda got: len(ours(got)) >= 3, timeout=30))
    by_name = {span.name: span for span in spans}
    assert sorted(by_name) == ["ext_authz Check", "ratelimit acquire", "store lookup_key"]
    check = by_name["ext_authz Check"]
    assert (check.service, check.kind) == (SERVICE_NAME, SERVER)
    # Envoy's own tracing is off (envoy.yaml's block is commented): the client is the parent.
    assert check.parent_span_id == client_span
    assert check.attributes == {
        "authz.decision": "allow",
        "authz.workspace_id": workspace_id,
        "authz.key_id": key["id"],
        "authz.key_cache": "miss",
    }
    for name in ("store lookup_key", "ratelimit acquire"):
        assert by_name[name].kind == CLIENT
        assert by_name[name].parent_span_id == check.span_id
    assert key["secret"] not in repr(receiver.spans)
