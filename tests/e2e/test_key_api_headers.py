"""The JSON key API through real Envoy answers as JSON only: no gRPC headers leak on success,
errors keep their HTTP status and JSON body, and native gRPC through Envoy keeps its status."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import grpc
import pytest

from authz.api.gen import keys_pb2, keys_pb2_grpc
from tests.e2e.conftest import build_stack
from tests.support.idp import TestIdp
from tests.support.stack import HttpAnswer, Stack, authz_cli

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def idp() -> Iterator[TestIdp]:
    with TestIdp().serve() as serving:
        yield serving


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, idp: TestIdp) -> Iterator[Stack]:
    log_dir = tmp_path_factory.mktemp("key-api-headers")
    env = {"AUTHZ_JWT_ISSUERS": json.dumps([idp.config()])}
    yield from build_stack(log_dir, f"sqlite:///{log_dir / 'authz.db'}", env)


@pytest.fixture
def workspace_id(stack: Stack) -> str:
    created = authz_cli(stack.database_url, "workspace", "create", f"ws-{time.monotonic_ns()}")
    workspace: str = created["id"]
    return workspace


def _call(
    stack: Stack, method: str, path: str, *, token: str | None, body: object = None
) -> HttpAnswer:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    return stack.request(path, method=method, headers=headers, body=data)


def _grpc_headers(answer: HttpAnswer) -> dict[str, str]:
    return {name: value for name, value in answer.headers.items() if name.startswith("grpc-")}


def test_successful_json_calls_carry_no_grpc_headers(
    stack: Stack, idp: TestIdp, workspace_id: str
) -> None:
    token = idp.token(workspaces=[workspace_id])
    keys = f"/keys/v1/workspaces/{workspace_id}/keys"
    created = _call(stack, "POST", keys, token=token, body={"label": "headers"})
    assert created.status == 200, created.body
    assert _grpc_headers(created) == {}
    assert created.headers["content-type"].startswith("application/json")
    key_id = created.json()["key"]["id"]
    for path in (keys, f"{keys}/{key_id}", f"/keys/v1/workspaces/{workspace_id}"):
        answer = _call(stack, "GET", path, token=token)
        assert answer.status == 200, (path, answer.body)
        assert _grpc_headers(answer) == {}, path


def test_errors_keep_their_http_status_and_json_body(
    stack: Stack, idp: TestIdp, workspace_id: str
) -> None:
    keys = f"/keys/v1/workspaces/{workspace_id}/keys"
    unsigned = _call(stack, "GET", keys, token=None)
    assert unsigned.status == 401
    assert unsigned.json()["code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
    missing = _call(
        stack, "GET", f"{keys}/key_doesnotexist0000", token=idp.token(workspaces=[workspace_id])
    )
    assert missing.status == 404
    assert missing.json()["code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert missing.json()["message"]
    for answer in (unsigned, missing):
        assert answer.headers["content-type"].startswith("application/json")
        assert _grpc_headers(answer) == {}


def test_native_grpc_through_envoy_keeps_its_status(
    stack: Stack, idp: TestIdp, workspace_id: str
) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{stack.envoy_port}") as channel:
        service = keys_pb2_grpc.KeyServiceStub(channel)
        request = keys_pb2.ListKeysRequest(workspace_id=workspace_id)
        with pytest.raises(grpc.RpcError) as refused:
            service.ListKeys(request, timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        token = idp.token(workspaces=[workspace_id])
        listed, call = service.ListKeys.with_call(
            request, metadata=[("authorization", f"Bearer {token}")], timeout=10
        )
        assert call.code() == grpc.StatusCode.OK
        assert list(listed.keys) == []
