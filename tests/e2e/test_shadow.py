"""Shadow enforcement (CONTRACT §3) as a client and the upstream see it behind real Envoy."""

from __future__ import annotations

import json
import time

import pytest

from tests.e2e.test_envoy_contract import new_key
from tests.support.stack import Stack, authz_cli, wait_until

pytestmark = pytest.mark.e2e

SHADOW_HEADER = "x-authz-shadow-deny"
RPM_REASON = "rate_limit_exceeded:requests"


def test_shadow_admits_marks_counts_then_enforce_refuses(embedded_stack: Stack) -> None:
    stack = embedded_stack
    workspace_id, key = new_key(stack, rpm=2)
    shadowed = authz_cli(
        stack.database_url, "workspace", "update", workspace_id, "--enforcement", "shadow"
    )
    assert shadowed["enforcement"] == "shadow"
    # A client's own mark is never what the upstream sees.
    headers = {"Authorization": f"Bearer {key['secret']}", SHADOW_HEADER: "forged:by-client"}

    answers = [stack.request("/v1/models", headers=headers) for _ in range(4)]
    assert [a.status for a in answers] == [200] * 4
    # The client sees the bucket as it is: empty.
    assert answers[-1].headers["x-ratelimit-remaining-requests"] == "0"
    received = [r["headers"] for r in stack.upstream_requests()[-4:]]
    assert [r["x-workspace-id"] for r in received] == [workspace_id] * 4
    assert [r.get(SHADOW_HEADER) for r in received] == [None, None, RPM_REASON, RPM_REASON]
    assert "forged" not in json.dumps(received)
    denials = stack.sidecar.metric(
        "authz_shadow_denials_total", workspace=workspace_id, reason=RPM_REASON
    )
    assert denials == 2

    # Switched to enforce, the sidecar hears it on its change feed and the next request is
    # refused: wait for that event, not for time.
    before = stack.sidecar.metric("authz_cache_invalidations_total", kind="ws")
    started = time.monotonic()
    updated = authz_cli(
        stack.database_url, "workspace", "update", workspace_id, "--enforcement", "enforce"
    )
    assert updated["enforcement"] == "enforce"
    wait_until(
        lambda: stack.sidecar.metric("authz_cache_invalidations_total", kind="ws") > before,
        timeout=10,
        what="workspace change received",
    )
    refused = stack.request("/v1/models", headers=headers)
    print(f"enforce live after {time.monotonic() - started:.3f}s (CLI start included)")
    assert refused.status == 429
    assert json.loads(refused.body)["error"]["code"] == "rate_limit_exceeded"
    assert (
        stack.sidecar.metric(
            "authz_shadow_denials_total", workspace=workspace_id, reason=RPM_REASON
        )
        == 2
    )
    audit = authz_cli(stack.database_url, "audit", "--workspace", workspace_id)
    assert [e["detail"] for e in audit if e["action"] == "workspace.update"] == [
        "enforcement enforce \u2192 shadow",
        "enforcement shadow \u2192 enforce",
    ]
