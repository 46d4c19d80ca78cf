"""Unknown usage is never free, through real Envoy: a stream that does not report its usage is
charged its reservation, so TPM, the monthly quota, spend and the ledger all see it."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import build_stack
from tests.e2e.test_usage import chat
from tests.support.stack import HttpAnswer, Stack, authz_cli, wait_until

pytestmark = pytest.mark.e2e

MAX_TOKENS = 500


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    yield from build_stack(
        tmp_path, f"sqlite:///{tmp_path / 'authz.db'}", env={"AUTHZ_LEDGER_FLUSH_S": "0.2"}
    )


def stream(stack: Stack, secret: str, *, include_usage: bool) -> tuple[HttpAnswer, bytes]:
    answer, body = chat(
        stack,
        secret,
        completion=MAX_TOKENS,
        stream=True,
        max_tokens=MAX_TOKENS,
        include_usage=include_usage,
    )
    return answer, body


def error_code(answer: HttpAnswer) -> str:
    if answer.status == 200:
        return "ok"
    return str(answer.json()["error"]["code"])


def test_streams_without_usage_are_charged_until_the_quota_says_429(stack: Stack) -> None:
    url = stack.database_url
    authz_cli(url, "price", "set", "demo-model", "--input", "2", "--output", "8")
    workspace = authz_cli(
        url, "workspace", "create", "streams", "--tpm", "2000", "--monthly-token-quota", "3000"
    )
    secret = authz_cli(url, "key", "create", "--workspace", workspace["id"], "--label", "t")[
        "secret"
    ]
    codes: list[str] = []
    reserve = 0

    def send() -> str:
        nonlocal reserve
        answer, body = stream(stack, secret, include_usage=False)
        reserve = math.ceil(len(body) / 4) + MAX_TOKENS
        code = error_code(answer)
        codes.append(code)
        if code == "ok":
            assert b'"usage"' not in answer.body  # the upstream reported nothing
            charged = codes.count("ok")
            wait_until(
                lambda: (
                    stack.sidecar.metric("authz_usage_reconciliations_total", result="estimated")
                    >= charged
                ),
                timeout=10,
                what=f"{charged} estimated reconciliations",
            )
        return code

    # Without the charge every stream was refunded: all 30 got 200. Now TPM holds first...
    while send() == "ok" and len(codes) < 30:
        pass
    assert codes == ["ok"] * (2000 // reserve) + ["rate_limit_exceeded"]
    # ...and with TPM lifted, the quota holds: what was charged uses it up.
    authz_cli(url, "workspace", "update", workspace["id"], "--tpm", "0")
    wait_until(lambda: send() != "rate_limit_exceeded", timeout=10, what="TPM lifted")
    while len(codes) < 30:
        send()
    admitted = 3000 // reserve
    assert codes.count("ok") == admitted
    assert codes[-10:] == ["insufficient_quota"] * 10

    def ledger() -> dict[str, Any]:
        report: dict[str, Any] = authz_cli(url, "usage", "--workspace", workspace["id"])
        return report

    wait_until(lambda: ledger()["requests"] == admitted, timeout=10, what="ledger flushed")
    report = ledger()
    assert (report["prompt_tokens"], report["completion_tokens"]) == (0, 0)
    assert report["estimated_requests"] == admitted
    assert report["estimated_tokens"] == report["total_tokens"] == admitted * reserve
    # Priced like the reservation: the split is unknown, so at the higher (output) rate.
    assert report["spend_usd"] == pytest.approx(admitted * reserve * 8 / 1e6)

    # The same month through the human report: estimated tokens shown apart.
    human = subprocess.run(
        [sys.executable, "-m", "authz", "usage", "--workspace", workspace["id"]],
        capture_output=True,
        text=True,
        env={"AUTHZ_DATABASE_URL": url, "PATH": "/usr/bin:/bin"},
        check=True,
        timeout=60,
    ).stdout
    assert f"{admitted * reserve} estimated for {admitted} requests" in human


def test_require_policy_answers_400_with_the_fix(stack: Stack) -> None:
    url = stack.database_url
    workspace = authz_cli(url, "workspace", "create", "strict", "--streaming-usage", "require")
    assert workspace["streaming_usage"] == "require"
    secret = authz_cli(url, "key", "create", "--workspace", workspace["id"], "--label", "t")[
        "secret"
    ]
    refused, _ = stream(stack, secret, include_usage=False)
    assert refused.status == 400
    error = refused.json()["error"]
    assert (error["code"], error["type"]) == ("stream_usage_required", "invalid_request_error")
    assert '"stream_options": {"include_usage": true}' in error["message"]
    fixed, _ = stream(stack, secret, include_usage=True)
    assert fixed.status == 200
    assert b'"usage"' in fixed.body
