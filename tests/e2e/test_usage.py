"""Usage accounting through real Envoy: its own filters extract usage, its access logs reach
the sidecar, and the TPM bucket, the quota and the ledger match what the upstream reported."""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import build_stack
from tests.support.stack import Stack, authz_cli, start_sidecar, wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    yield from build_stack(
        tmp_path, f"sqlite:///{tmp_path / 'authz.db'}", env={"AUTHZ_LEDGER_FLUSH_S": "0.2"}
    )


def workspace_key(stack: Stack, *args: str) -> tuple[str, dict[str, str]]:
    workspace = authz_cli(
        stack.database_url, "workspace", "create", f"ws-{time.monotonic_ns()}", *args
    )
    key = authz_cli(
        stack.database_url, "key", "create", "--workspace", workspace["id"], "--label", "t"
    )
    return workspace["id"], key


def chat(
    stack: Stack,
    secret: str,
    *,
    completion: int,
    stream: bool = False,
    max_tokens: int = 40,
    include_usage: bool = True,
    model: str = "demo-model",
    headers: dict[str, str] | None = None,
) -> Any:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "count the tokens"}],
    }
    if stream:
        body["stream"] = True
        if include_usage:
            body["stream_options"] = {"include_usage": True}
    encoded = json.dumps(body).encode()
    answer = stack.request(
        "/v1/chat/completions",
        headers={
            "Authorization": f"Bearer {secret}",
            "Content-Type": "application/json",
            "x-demo-completion-tokens": str(completion),
            **(headers or {}),
        },
        body=encoded,
    )
    return answer, encoded


def reconciled(stack: Stack, count: int) -> None:
    """Wait until the sidecar has reconciled `count` access-log entries in total."""

    def done() -> bool:
        return (
            stack.sidecar.metric("authz_usage_reconciliations_total", result="reported")
            + stack.sidecar.metric("authz_usage_reconciliations_total", result="no_usage")
            >= count
        )

    wait_until(done, timeout=10, what=f"{count} reconciliations")


def ledger(stack: Stack, workspace_id: str) -> dict[str, Any]:
    report: dict[str, Any] = authz_cli(stack.database_url, "usage", "--workspace", workspace_id)
    return report


def restart_sidecar(stack: Stack, sig: signal.Signals, secret: str, *, flush_s: str) -> int:
    """Stop the sidecar with `sig`, start a new one on the same ports, wait for one good request.

    Returns the old process's exit code. The good request counts as one in the ledger.
    """
    old = stack.sidecar
    old.process.send_signal(sig)
    code = old.process.wait(timeout=15)
    stack.sidecar = start_sidecar(
        Path(old.process.log_path).parent,
        database_url=stack.database_url,
        name=f"sidecar-after-{sig.name.lower()}",
        env={"AUTHZ_LEDGER_FLUSH_S": flush_s},
        grpc_addr=old.grpc_addr,
        metrics_addr=old.metrics_addr,
    )
    wait_until(
        lambda: chat(stack, secret, completion=2)[0].status == 200,
        timeout=15,
        what="traffic through the new sidecar",
    )
    return code


def test_json_and_sse_usage_reconcile_bucket_ledger_and_metrics(stack: Stack) -> None:
    authz_cli(stack.database_url, "price", "set", "demo-model", "--input", "2", "--output", "8")
    workspace_id, key = workspace_key(stack, "--rpm", "1000", "--tpm", "120")
    secret = key["secret"]

    first, body = chat(stack, secret, completion=3)
    assert first.status == 200
    usage = first.json()["usage"]
    prompt = math.ceil(len(body) / 4)
    assert usage == {"prompt_tokens": prompt, "completion_tokens": 3, "total_tokens": prompt + 3}
    reserved = prompt + 40
    assert int(first.headers["x-ratelimit-remaining-tokens"]) == 120 - reserved
    reconciled(stack, 1)

    # Only the real usage stays charged: the next reservation finds the refund in the bucket.
    started = time.monotonic()
    second, stream_body = chat(stack, secret, completion=5, stream=True)
    assert second.status == 200
    assert b'"usage"' in second.body
    assert b"data: [DONE]" in second.body
    prompt_stream = math.ceil(len(stream_body) / 4)
    expected = 120 - (prompt + 3) - (prompt_stream + 40)
    refill = math.ceil((time.monotonic() - started + 1.0) * 120 / 60)
    remaining = int(second.headers["x-ratelimit-remaining-tokens"])
    assert expected <= remaining <= expected + refill
    reconciled(stack, 2)

    wait_until(
        lambda: ledger(stack, workspace_id)["requests"] == 2, timeout=5, what="ledger flushed"
    )
    report = ledger(stack, workspace_id)
    # The ledger holds exactly what the upstream reported, at the model's price.
    assert report["prompt_tokens"] == prompt + prompt_stream
    assert report["completion_tokens"] == 3 + 5
    assert [m["model"] for m in report["by_model"]] == ["demo-model"]
    assert report["spend_usd"] == pytest.approx(((prompt + prompt_stream) * 2 + 8 * 8) / 1e6)

    metric = stack.sidecar.metric
    assert metric("authz_workspace_tokens_total", workspace=workspace_id, kind="completion") == 8
    assert metric("authz_workspace_tokens_total", workspace=workspace_id, kind="prompt") == (
        prompt + prompt_stream
    )
    assert metric("authz_workspace_requests_total", workspace=workspace_id, status_class="2xx") == 2
    assert metric("authz_workspace_spend_usd_total", workspace=workspace_id) == pytest.approx(
        report["spend_usd"]
    )
    assert metric("authz_workspace_upstream_duration_seconds_count", workspace=workspace_id) == 2


def test_failed_upstream_refunds_the_reservation(stack: Stack) -> None:
    workspace_id, key = workspace_key(stack, "--tpm", "100")
    answer = stack.request(
        "/v1/chat/completions",
        headers={
            "Authorization": f"Bearer {key['secret']}",
            "Content-Type": "application/json",
            "x-demo-status": "503",
        },
        body=json.dumps({"model": "demo-model", "max_tokens": 60}).encode(),
    )
    assert answer.status == 503
    reconciled(stack, 1)
    # Without the refund 60+ tokens would still be held and this 70-token request would wait.
    again, _ = chat(stack, key["secret"], completion=1, max_tokens=60)
    assert again.status == 200
    wait_until(lambda: ledger(stack, workspace_id)["errors_5xx"] == 1, timeout=5, what="ledger")
    assert ledger(stack, workspace_id)["requests"] >= 1


def test_token_quota_gives_insufficient_quota_at_the_right_request(stack: Stack) -> None:
    workspace_id, key = workspace_key(stack, "--monthly-token-quota", "100")
    statuses = []
    for _ in range(4):
        answer, _ = chat(stack, key["secret"], completion=10, max_tokens=10)
        statuses.append(answer.status)
        if answer.status != 200:
            break
        reconciled(stack, len(statuses))
    # Each request uses about 40 tokens: two fit in 100, the third would pass the quota.
    assert statuses == [200, 200, 429]
    error = answer.json()["error"]
    assert (error["code"], error["type"]) == ("insufficient_quota", "insufficient_quota")
    assert "monthly token quota 100" in error["message"]
    assert int(answer.headers["retry-after"]) > 0
    wait_until(lambda: ledger(stack, workspace_id)["requests"] == 2, timeout=5, what="ledger")
    report = ledger(stack, workspace_id)
    assert report["completion_tokens"] == 20
    assert report["total_tokens"] <= 100


def test_restart_mid_traffic_loses_nothing_and_counts_nothing_twice(stack: Stack) -> None:
    workspace_id, key = workspace_key(stack)
    for _ in range(5):
        assert chat(stack, key["secret"], completion=2)[0].status == 200
    reconciled(stack, 5)

    assert restart_sidecar(stack, signal.SIGTERM, key["secret"], flush_s="0.2") == 0
    for _ in range(3):
        assert chat(stack, key["secret"], completion=2)[0].status == 200
    reconciled(stack, 4)
    wait_until(lambda: ledger(stack, workspace_id)["requests"] == 9, timeout=5, what="ledger")
    report = ledger(stack, workspace_id)
    assert report["completion_tokens"] == 9 * 2


def test_spend_cap_gives_insufficient_quota_and_the_ledger_shows_the_spend(stack: Stack) -> None:
    # $1000 per 1M tokens: each token costs $0.001, so a $0.10 cap holds about 100 tokens.
    authz_cli(
        stack.database_url, "price", "set", "demo-model", "--input", "1000", "--output", "1000"
    )
    workspace_id, key = workspace_key(stack, "--monthly-spend-cap", "0.10")
    statuses = []
    for _ in range(4):
        answer, body = chat(stack, key["secret"], completion=10, max_tokens=10)
        statuses.append(answer.status)
        if answer.status != 200:
            break
        reconciled(stack, len(statuses))
    per_request = math.ceil(len(body) / 4) + 10
    assert per_request * 3 > 100 >= per_request * 2  # the third request would pass the cap
    assert statuses == [200, 200, 429]
    error = answer.json()["error"]
    assert (error["code"], error["type"]) == ("insufficient_quota", "insufficient_quota")
    assert "monthly spend cap $0.10" in error["message"]
    wait_until(lambda: ledger(stack, workspace_id)["requests"] == 2, timeout=5, what="ledger")
    assert ledger(stack, workspace_id)["spend_usd"] == pytest.approx(2 * per_request / 1000)


@pytest.fixture
def slow_retry_stack(tmp_path: Path) -> Iterator[Stack]:
    # A 60 s retry timer: only the per-batch write can put rows in the ledger quickly.
    yield from build_stack(
        tmp_path, f"sqlite:///{tmp_path / 'authz.db'}", env={"AUTHZ_LEDGER_FLUSH_S": "60"}
    )


def test_ledger_is_written_per_access_log_batch_and_survives_a_hard_kill(
    slow_retry_stack: Stack,
) -> None:
    stack = slow_retry_stack
    workspace_id, key = workspace_key(stack)
    for _ in range(4):
        assert chat(stack, key["secret"], completion=2)[0].status == 200
    wait_until(lambda: ledger(stack, workspace_id)["requests"] == 4, timeout=5, what="ledger")

    assert restart_sidecar(stack, signal.SIGKILL, key["secret"], flush_s="60") == -signal.SIGKILL
    wait_until(lambda: ledger(stack, workspace_id)["requests"] == 5, timeout=5, what="ledger")
    assert ledger(stack, workspace_id)["completion_tokens"] == 5 * 2
