"""Latency percentiles and denials by reason through real Envoy: its access log reaches the
sidecar, and ConsoleService.GetObservations answers per hour and per key."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from authz.api.gen import console_pb2, console_pb2_grpc
from tests.e2e.conftest import build_stack
from tests.support.idp import TestIdp
from tests.support.stack import Stack, authz_cli, wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture
def idp() -> Iterator[TestIdp]:
    with TestIdp().serve() as serving:
        yield serving


@pytest.fixture
def stack(tmp_path: Path, idp: TestIdp) -> Iterator[Stack]:
    env = {"AUTHZ_JWT_ISSUERS": json.dumps([idp.config()]), "AUTHZ_LEDGER_FLUSH_S": "0.2"}
    yield from build_stack(tmp_path, f"sqlite:///{tmp_path / 'authz.db'}", env)


def workspace_key(stack: Stack, *args: str) -> tuple[str, dict[str, str]]:
    workspace = authz_cli(
        stack.database_url, "workspace", "create", f"ws-{time.monotonic_ns()}", *args
    )
    key = authz_cli(
        stack.database_url, "key", "create", "--workspace", workspace["id"], "--label", "t"
    )
    return workspace["id"], key


def chat(stack: Stack, secret: str, max_tokens: int = 20) -> int:
    body = {"model": "demo-model", "max_tokens": max_tokens, "messages": []}
    return stack.request(
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"},
        body=json.dumps(body).encode(),
    ).status


def observations(
    stack: Stack, idp: TestIdp, workspace_id: str, member_of: str = "", *, via_envoy: bool = False
) -> Any:
    now = datetime.now(UTC)
    request = console_pb2.GetObservationsRequest(workspace_id=workspace_id)
    request.since.FromDatetime(now - timedelta(hours=2))
    request.until.FromDatetime(now + timedelta(hours=1))
    token = idp.token(workspaces=[member_of or workspace_id])
    # The console in Kubernetes calls through Envoy's listener (deploy/k8s/base/console.yaml).
    target = f"127.0.0.1:{stack.envoy_port}" if via_envoy else stack.sidecar.grpc_addr
    with grpc.insecure_channel(target) as channel:
        stub = console_pb2_grpc.ConsoleServiceStub(channel)
        return stub.GetObservations(
            request, metadata=(("authorization", f"Bearer {token}"),), timeout=5
        )


def test_percentiles_and_denials_by_reason_per_key(stack: Stack, idp: TestIdp) -> None:
    busy, busy_key = workspace_key(stack, "--rpm", "2")
    small, small_key = workspace_key(stack, "--tpm", "100")
    assert [chat(stack, busy_key["secret"]) for _ in range(3)] == [200, 200, 429]
    assert chat(stack, small_key["secret"], max_tokens=5000) == 429  # larger than the TPM
    assert chat(stack, small_key["secret"]) == 200

    def seen(workspace_id: str, requests: int, denials: int) -> bool:
        answer = observations(stack, idp, workspace_id)
        return bool(
            answer.total.requests == requests
            and sum(n for k in answer.keys for n in k.denials.values()) == denials
        )

    wait_until(lambda: seen(busy, 2, 1), timeout=15, what="busy workspace observations")
    wait_until(lambda: seen(small, 1, 1), timeout=15, what="small workspace observations")

    answer = observations(stack, idp, busy)
    [key] = answer.keys
    assert key.key_id == busy_key["id"]
    assert dict(key.denials) == {"rate_limit_requests": 1}
    assert key.latency.requests == 2
    # Real durations through Envoy and the demo upstream: milliseconds, not zero, not minutes.
    assert 0 < key.latency.p50_ms <= key.latency.p95_ms < 5000
    # Per hour too (the requests may straddle an hour's turn).
    assert sum(h.latency.requests for h in answer.hours) == 2
    assert sum(h.denials["rate_limit_requests"] for h in answer.hours) == 1

    assert observations(stack, idp, busy, via_envoy=True) == answer
    small_answer = observations(stack, idp, small)
    assert [dict(k.denials) for k in small_answer.keys] == [{"rate_limit_tokens": 1}]

    # Another workspace's observations stay closed to this member.
    with pytest.raises(grpc.RpcError) as caught:
        observations(stack, idp, small, member_of=busy)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
