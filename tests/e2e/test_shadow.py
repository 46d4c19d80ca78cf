"""Shadow enforcement (CONTRACT §3) as a client and the upstream see it behind real Envoy."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from tests.e2e.test_envoy_contract import new_key
from tests.e2e.test_usage import chat, workspace_key
from tests.support.stack import Stack, authz_cli, change_applied_after, wait_until

pytestmark = pytest.mark.e2e

SHADOW_HEADER = "x-authz-shadow-deny"
RPM_REASON = "rate_limit_exceeded:requests"
TPM_REASON = "rate_limit_exceeded:tokens"
TPM = 2000


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
    # refused: wait for the sidecar's own line applying this change (an earlier change's
    # invalidation, still on its way, must not count), not for time.
    updated = authz_cli(
        stack.database_url, "workspace", "update", workspace_id, "--enforcement", "enforce"
    )
    assert updated["enforcement"] == "enforce"
    assert change_applied_after(stack.sidecar, "ws", updated["updated_at"]) < 1.0
    refused = stack.request("/v1/models", headers=headers)
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


def _switch_to_enforce(stack: Stack, workspace_id: str) -> None:
    before = stack.sidecar.metric("authz_cache_invalidations_total", kind="ws")
    authz_cli(stack.database_url, "workspace", "update", workspace_id, "--enforcement", "enforce")
    wait_until(
        lambda: stack.sidecar.metric("authz_cache_invalidations_total", kind="ws") > before,
        timeout=10,
        what="workspace change received",
    )


def test_shadow_would_be_denials_leave_no_debt_and_count_in_full(embedded_stack: Stack) -> None:
    """A shadow workspace's preview is what enforce would do: requests it would refuse never
    consume the TPM bucket, so switched to enforce it is not first made to wait off their
    debt. Their usage is still the month's and the ledger's, reported or estimated."""
    stack = embedded_stack
    workspace_id, key = workspace_key(
        stack, "--rpm", "1000", "--tpm", str(TPM), "--enforcement", "shadow"
    )
    secret = key["secret"]

    def reconciled(result: str, count: float) -> None:
        wait_until(
            lambda: (
                stack.sidecar.metric("authz_usage_reconciliations_total", result=result) >= count
            ),
            timeout=10,
            what=f"{count} {result} reconciliations",
        )

    reported = stack.sidecar.metric("authz_usage_reconciliations_total", result="reported")
    estimated = stack.sidecar.metric("authz_usage_reconciliations_total", result="estimated")
    # Admitted for real: it takes its estimate and uses exactly that, leaving about 470.
    first, body = chat(stack, secret, completion=1500, max_tokens=1500)
    assert first.status == 200
    charged = first.json()["usage"]["total_tokens"]
    assert charged == math.ceil(len(body) / 4) + 1500
    reconciled("reported", reported + 1)
    # Three more that do not fit: enforce would refuse them, shadow admits them, and each
    # really uses all it asked for. As debt, 5,800 tokens would keep the workspace out for
    # about 3 minutes after the switch.
    for _ in range(3):
        over, body = chat(stack, secret, completion=1900, max_tokens=1900)
        assert over.status == 200
        charged += over.json()["usage"]["total_tokens"]
    marks = [r["headers"].get(SHADOW_HEADER) for r in stack.upstream_requests()[-3:]]
    assert marks == [TPM_REASON] * 3
    reconciled("reported", reported + 4)
    # A would-be denial whose stream never reports its usage: charged its estimate.
    unreported, body = chat(
        stack, secret, completion=1900, max_tokens=1900, stream=True, include_usage=False
    )
    assert unreported.status == 200
    assert b'"usage"' not in unreported.body
    assert stack.upstream_requests()[-1]["headers"].get(SHADOW_HEADER) == TPM_REASON
    estimate = math.ceil(len(body) / 4) + 1900
    reconciled("estimated", estimated + 1)

    _switch_to_enforce(stack, workspace_id)
    admitted, body = chat(stack, secret, completion=10, max_tokens=10)
    assert admitted.status == 200, admitted.body
    assert SHADOW_HEADER not in stack.upstream_requests()[-1]["headers"]
    charged += admitted.json()["usage"]["total_tokens"]
    reconciled("reported", reported + 5)

    def ledger() -> dict[str, Any]:
        report: dict[str, Any] = authz_cli(stack.database_url, "usage", "--workspace", workspace_id)
        return report

    wait_until(lambda: ledger()["requests"] == 6, timeout=10, what="ledger flushed")
    report = ledger()
    assert report["prompt_tokens"] + report["completion_tokens"] == charged
    assert (report["estimated_requests"], report["estimated_tokens"]) == (1, estimate)
    assert report["total_tokens"] == charged + estimate
