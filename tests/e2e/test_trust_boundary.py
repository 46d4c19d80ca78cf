"""The trust boundary and honest pricing through real Envoy and `authz serve`.

The upstream answers with dated model names (ask `gpt-4o`, get `gpt-4o-2024-08-06`), as real
providers do: the charge still uses the price of the model asked for, in force at Check time,
so the spend cap stops the right request. A hand-built access-log message sent straight to the
sidecar's gRPC port, as any pod that can reach it could, changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import build_stack
from tests.e2e.test_usage import chat, ledger, reconciled, workspace_key
from tests.support.accesslogs import log_entry, send
from tests.support.stack import Stack, authz_cli

pytestmark = pytest.mark.e2e

DATED = "-2024-08-06"


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    yield from build_stack(
        tmp_path, f"sqlite:///{tmp_path / 'authz.db'}", env={"AUTHZ_LEDGER_FLUSH_S": "0.2"}
    )


def ask(stack: Stack, secret: str, *, completion: int, stream: bool = False) -> Any:
    """Ask for gpt-4o; the upstream answers with gpt-4o-2024-08-06. (answer, prompt tokens)"""
    answer, body = chat(
        stack,
        secret,
        completion=completion,
        stream=stream,
        max_tokens=completion,
        model="gpt-4o",
        headers={"x-demo-model-suffix": DATED},
    )
    return answer, math.ceil(len(body) / 4)


def test_dated_model_names_are_charged_at_the_requested_models_price(stack: Stack) -> None:
    # $2.50 / $10 per 1M tokens: 1000 completion tokens cost $0.01, and the Check's estimate
    # (every token at the higher rate) is a little more. A $0.035 cap admits three requests.
    authz_cli(stack.database_url, "price", "set", "gpt-4o", "--input", "2.5", "--output", "10")
    workspace_id, key = workspace_key(stack, "--monthly-spend-cap", "0.035")
    statuses, prompts = [], []
    for n in range(1, 5):
        answer, prompt = ask(stack, key["secret"], completion=1000, stream=n == 2)
        statuses.append(answer.status)
        if answer.status != 200:
            break
        prompts.append(prompt)
        if n != 2:
            assert answer.json()["model"] == "gpt-4o" + DATED
        reconciled(stack, n)
    assert statuses == [200, 200, 200, 429]
    error = answer.json()["error"]
    assert error["code"] == "insufficient_quota"
    assert "monthly spend cap" in error["message"]

    report = ledger(stack, workspace_id)
    expected = sum(p * 2.5 + 1000 * 10 for p in prompts) / 1e6
    assert report["requests"] == 3
    # (Within the per-request rounding to whole micro-USD, which the billing work tightens.)
    assert report["spend_usd"] == pytest.approx(expected, abs=len(prompts) * 1e-6)
    # The ledger files usage under the model the client asked for.
    assert [m["model"] for m in report["by_model"]] == ["gpt-4o"]
    # Every entry real Envoy sent carried a reservation that verified.
    for reason in ("unsigned", "bad_mac", "too_old", "replay"):
        assert stack.sidecar.metric("authz_usage_entries_refused_total", reason=reason) == 0


def test_a_forged_access_log_message_changes_nothing(stack: Stack) -> None:
    victim, key = workspace_key(stack, "--monthly-token-quota", "100000")
    answer, prompt = ask(stack, key["secret"], completion=3)
    assert answer.status == 200
    reconciled(stack, 1)
    before = ledger(stack, victim)
    assert before["total_tokens"] == prompt + 3

    forged = log_entry(
        {
            "decision": "allow",
            "workspace_id": victim,
            "key_id": key["id"],
            "reserved_tokens": 999999,
        },
        {"model": "forged", "prompt_tokens": 999999999, "completion_tokens": 0},
        started=datetime.now(UTC),
    )
    asyncio.run(send(stack.sidecar.grpc_addr, [forged]))
    refused = stack.sidecar.metric("authz_usage_entries_refused_total", reason="unsigned")
    assert refused == 1
    # The victim can still spend its quota, and its bill is what it used.
    again, prompt_again = ask(stack, key["secret"], completion=3)
    assert again.status == 200
    reconciled(stack, 2)
    after = ledger(stack, victim)
    assert after["total_tokens"] == before["total_tokens"] + prompt_again + 3
    assert "forged" not in json.dumps(after)
