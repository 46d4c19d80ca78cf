"""A ledger that cannot be poisoned, through real Envoy on PostgreSQL (which refuses NUL in
text): a hostile model name from one tenant never stops another tenant's usage."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from authz.usage.events import INVALID_TEXT
from tests.e2e.conftest import build_stack
from tests.support.stack import Stack, authz_cli, wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture
def stack(tmp_path: Path, pg_dsn: str) -> Iterator[Stack]:
    authz_cli(pg_dsn, "migrate")
    yield from build_stack(tmp_path, pg_dsn, env={"AUTHZ_LEDGER_FLUSH_S": "0.2"})


def tenant(stack: Stack, name: str) -> tuple[str, str]:
    workspace = authz_cli(stack.database_url, "workspace", "create", name)
    key = authz_cli(
        stack.database_url, "key", "create", "--workspace", workspace["id"], "--label", "t"
    )
    return workspace["id"], key["secret"]


def send(stack: Stack, secret: str, raw_body: str) -> int:
    return stack.request(
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"},
        body=raw_body.encode(),
    ).status


def ledger(stack: Stack, workspace_id: str) -> dict[str, Any]:
    report: dict[str, Any] = authz_cli(stack.database_url, "usage", "--workspace", workspace_id)
    return report


def test_a_nul_model_from_one_tenant_does_not_stop_the_next_tenants_ledger(stack: Stack) -> None:
    tenant_a, secret_a = tenant(stack, "a")
    tenant_b, secret_b = tenant(stack, "b")
    # The upstream echoes the model, as real ones do: the NUL comes back in the response.
    assert send(stack, secret_a, '{"model": "x\\u0000y", "max_tokens": 5}') == 200
    wait_until(
        lambda: stack.sidecar.metric("authz_usage_fields_rejected_total", field="model") == 1,
        timeout=10,
        what="the hostile model rejected",
    )
    plain = json.dumps({"model": "demo-model", "max_tokens": 5})
    for _ in range(10):
        assert send(stack, secret_b, plain) == 200
    wait_until(lambda: ledger(stack, tenant_b)["requests"] == 10, timeout=10, what="B's ledger")
    report_a = ledger(stack, tenant_a)
    assert report_a["requests"] == 1
    assert [m["model"] for m in report_a["by_model"]] == [INVALID_TEXT]
    assert stack.sidecar.metric("authz_ledger_rows_set_aside_total") == 0
