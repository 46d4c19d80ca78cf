"""Key management as a console sees it: JSON over HTTP through real Envoy, JWTs from a loopback
identity provider, and the keys it makes used against the OpenAI-compatible API right away."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from authz.keys import generate_key, is_well_formed
from tests.e2e.conftest import build_stack
from tests.support.idp import TestIdp
from tests.support.stack import (
    FEED_LOGS,
    HttpAnswer,
    Stack,
    authz_cli,
    change_applied_after,
    wait_until,
)

pytestmark = pytest.mark.e2e

LIMIT_MESSAGE = "key limit reached: revoke an unused key before generating a replacement"


@dataclass
class Console:
    """A console user's view: Envoy, a workspace, and tokens from the identity provider."""

    stack: Stack
    idp: TestIdp
    workspace_id: str

    def call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        token: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> HttpAnswer:
        sent = {"Content-Type": "application/json", **(headers or {})}
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        return self.stack.request(
            path,
            method=method,
            headers=sent,
            body=None if body is None else json.dumps(body).encode(),
        )

    def token(self, **claims: Any) -> str:
        claims.setdefault("workspaces", [self.workspace_id])
        return self.idp.token(**claims)

    @property
    def keys_path(self) -> str:
        return f"/keys/v1/workspaces/{self.workspace_id}/keys"

    def create(self, label: str) -> dict[str, Any]:
        answer = self.call("POST", self.keys_path, {"label": label}, token=self.token())
        assert answer.status == 200, answer.body
        created: dict[str, Any] = answer.json()
        return created

    def openai_status(self, secret: str) -> int:
        return self.stack.request(
            "/v1/models", headers={"Authorization": f"Bearer {secret}"}
        ).status


@pytest.fixture(scope="module")
def idp() -> Iterator[TestIdp]:
    with TestIdp().serve() as serving:
        yield serving


@pytest.fixture(scope="module")
def key_stack(tmp_path_factory: pytest.TempPathFactory, idp: TestIdp) -> Iterator[Stack]:
    log_dir = tmp_path_factory.mktemp("keys-stack")
    env = {"AUTHZ_JWT_ISSUERS": json.dumps([idp.config()]), **FEED_LOGS}
    yield from build_stack(log_dir, f"sqlite:///{log_dir / 'authz.db'}", env)


@pytest.fixture
def console(key_stack: Stack, idp: TestIdp) -> Console:
    workspace = authz_cli(
        key_stack.database_url,
        "workspace",
        "create",
        f"ws-{time.monotonic_ns()}",
        "--key-limit",
        "3",
    )
    return Console(key_stack, idp, workspace["id"])


def test_create_and_list_as_json_and_the_key_works_at_once(console: Console) -> None:
    created = console.create("console-app")
    secret = created["secret"]
    assert is_well_formed(secret)
    key = created["key"]
    assert key["workspace_id"] == console.workspace_id
    assert key["label"] == "console-app"
    assert key["mask"] == secret[:5] + "*" * 10 + secret[-4:]
    assert key["active"] is True
    assert console.openai_status(secret) == 200

    listed = console.call("GET", console.keys_path, token=console.token())
    assert listed.status == 200
    assert listed.headers["content-type"].startswith("application/json")
    assert [k["id"] for k in listed.json()["keys"]] == [key["id"]]
    assert secret not in listed.body.decode()

    one = console.call("GET", f"{console.keys_path}/{key['id']}", token=console.token())
    assert one.json()["mask"] == key["mask"]
    workspace = console.call(
        "GET", f"/keys/v1/workspaces/{console.workspace_id}", token=console.token()
    )
    assert (workspace.json()["key_limit"], workspace.json()["active_keys"]) == ("3", "1")


def test_sign_in_failures_are_401_and_403_through_envoy(console: Console, idp: TestIdp) -> None:
    live_key = console.create("ci")["secret"]
    path = console.keys_path
    unauthenticated = {
        "missing": None,
        "api key": live_key,
        "expired": console.token(expires_in=-120),
        "wrong audience": console.token(audience="elsewhere"),
        "unsupported issuer": console.token(issuer="https://accounts.elsewhere.example"),
    }
    for case, token in unauthenticated.items():
        answer = console.call("GET", path, token=token)
        assert answer.status == 401, (case, answer.body)
        assert answer.json()["code"] == 16, case
    answer = console.call("GET", path, token=live_key)
    assert "an API key cannot manage keys" in answer.json()["message"]
    answer = console.call("GET", path, token=unauthenticated["unsupported issuer"])
    assert "unsupported sign-in provider" in answer.json()["message"]
    assert console.call("POST", path, {"label": "x"}, token=live_key).status == 401

    forbidden = {
        "no permission": console.token(permissions=["keys:read"]),
        "wrong workspace": console.token(workspaces=["ws_someone_else"]),
    }
    for case, token in forbidden.items():
        answer = console.call("POST", path, {"label": "x"}, token=token)
        assert answer.status == 403, (case, answer.body)
        assert answer.json()["code"] == 7, case
    listed = console.call("GET", path, token=console.token()).json()["keys"]
    assert len(listed) == 1  # nothing was created by the refused calls

    # ext_authz is off on this route: nothing of it reached the OpenAI-compatible upstream.
    seen = [r["path"] for r in console.stack.upstream_requests()]
    assert not any(p.startswith(("/keys/", "/tokenfactory.")) for p in seen)


def test_unknown_key_api_path_is_404_and_never_reaches_the_upstream(console: Console) -> None:
    answer = console.call("DELETE", console.keys_path, token=console.token())
    assert answer.status == 404
    assert answer.json()["message"] == "no such key management endpoint"


def test_concurrent_creates_at_the_limit_through_envoy(console: Console) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(
            pool.map(
                lambda i: console.call(
                    "POST", console.keys_path, {"label": f"w{i}"}, token=console.token()
                ),
                range(8),
            )
        )
    statuses = sorted(a.status for a in answers)
    assert statuses == [200] * 3 + [400] * 5
    refused = [a.json() for a in answers if a.status == 400]
    assert {(r["code"], r["message"]) for r in refused} == {(9, LIMIT_MESSAGE)}


def test_rotation_overlap_then_revoke(console: Console) -> None:
    old = console.create("payments")
    rotated = console.call(
        "POST", f"{console.keys_path}/{old['key']['id']}:rotate", {}, token=console.token()
    )
    assert rotated.status == 200, rotated.body
    body = rotated.json()
    assert body["replacement"]["label"].startswith("payments (rotated ")
    new_secret = body["secret"]
    # Both keys work during the overlap: deploy the new one, verify, then revoke the old.
    assert console.openai_status(old["secret"]) == 200
    assert console.openai_status(new_secret) == 200

    revoked = console.call(
        "POST", f"{console.keys_path}/{old['key']['id']}:revoke", {}, token=console.token()
    )
    assert revoked.status == 200
    assert revoked.json()["active"] is False
    wait_until(lambda: console.openai_status(old["secret"]) == 401, timeout=10, what="revoked")
    # From the commit to the sidecar applying it, by the sidecar's own log line.
    revoked_at = revoked.json()["revoked_at"]
    assert change_applied_after(console.stack.sidecar, "key", revoked_at) < 1.0
    assert console.openai_status(new_secret) == 200


def test_rotation_grace_deadline_is_enforced(console: Console) -> None:
    # The deadline is what is under test, not the workspace's rate limit: the polling below
    # sends a request every 20 ms, which drains the default 60 RPM bucket (and, over 8 s, the
    # TPM one) and turned the final 200 into a 429. So this workspace is unmetered.
    unmetered = ("--rpm", "0", "--tpm", "0")
    authz_cli(console.stack.database_url, "workspace", "update", console.workspace_id, *unmetered)
    old = console.create("batch")
    rotated = console.call(
        "POST",
        f"{console.keys_path}/{old['key']['id']}:rotate",
        {"grace_period": "3s"},
        token=console.token(),
    )
    assert rotated.status == 200, rotated.body
    body = rotated.json()
    assert body["previous"]["expires_at"]
    assert console.openai_status(old["secret"]) == 200
    assert console.openai_status(body["secret"]) == 200
    wait_until(
        lambda: console.openai_status(old["secret"]) == 401, timeout=8, what="grace deadline"
    )
    assert console.openai_status(body["secret"]) == 200


def test_audit_names_the_signed_in_user_and_the_client_address(
    console: Console, idp: TestIdp
) -> None:
    created = console.create("audited")
    console.call(
        "POST",
        f"{console.keys_path}/{created['key']['id']}:revoke",
        {"leaked": True},
        token=console.token(subject="carol@example.com"),
        headers={"X-Forwarded-For": "198.51.100.23", "X-Envoy-External-Address": "203.0.113.9"},
    )
    entries = authz_cli(console.stack.database_url, "audit", "--workspace", console.workspace_id)
    revoke = next(e for e in entries if e["action"] == "key.revoke")
    assert revoke["incident"] is True
    assert (revoke["actor_subject"], revoke["actor_issuer"]) == ("carol@example.com", idp.issuer)
    # Envoy's view of the client (use_remote_address: the test's loopback connection) is
    # recorded; the client's own claims are not, and the hop that vouched for it (Envoy, on
    # loopback) is kept.
    hop, via, peer = revoke["actor_address"].partition(" via ")
    assert hop == "127.0.0.1"
    assert via
    assert peer.startswith("127.0.0.1:")
    create = next(e for e in entries if e["action"] == "key.create")
    assert create["actor_subject"] == "alice@example.com"


def test_key_service_is_listed_by_reflection(key_stack: Stack) -> None:
    with grpc.insecure_channel(key_stack.sidecar.grpc_addr) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (answer,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    names = {s.name for s in answer.list_services_response.service}
    assert "tokenfactory.keys.v1.KeyService" in names
    assert "envoy.service.auth.v3.Authorization" in names


def test_an_api_key_never_reaches_key_management_even_if_valid(console: Console) -> None:
    """Belt and braces: a live key in the Authorization header of every key API route."""
    secret = console.create("probe")["secret"]
    key_id = console.call("GET", console.keys_path, token=console.token()).json()["keys"][0]["id"]
    for method, path, body in (
        ("GET", console.keys_path, None),
        ("POST", console.keys_path, {"label": "x"}),
        ("GET", f"{console.keys_path}/{key_id}", None),
        ("POST", f"{console.keys_path}/{key_id}:rotate", {}),
        ("POST", f"{console.keys_path}/{key_id}:revoke", {}),
        ("GET", f"/keys/v1/workspaces/{console.workspace_id}", None),
        ("GET", f"/keys/v1/workspaces/{console.workspace_id}/usage", None),
    ):
        assert console.call(method, path, body, token=secret).status == 401, path
        assert console.call(method, path, body, token=generate_key()).status == 401, path
    assert console.openai_status(secret) == 200


def test_unknown_body_fields_are_a_400_naming_the_field(console: Console) -> None:
    key_id = console.create("strict")["key"]["id"]
    keys = console.keys_path
    for path, body, field, expected in (
        (keys, {"lable": "x"}, "lable", "label"),
        (f"{keys}/{key_id}:rotate", {"grace": "60s"}, "grace", "label, grace_period"),
        (f"{keys}/{key_id}:revoke", {"leaked": True, "why": "x"}, "why", "leaked"),
        (keys, {"label": "x", "workspace_id": "ws_other"}, "workspace_id", "label"),
    ):
        answer = console.call("POST", path, body, token=console.token())
        assert answer.status == 400, (path, answer.body)
        assert answer.json()["message"] == (
            f"unknown field {field!r} in the request body; expected: {expected}"
        )
    assert len(console.call("GET", keys, token=console.token()).json()["keys"]) == 1
    assert console.openai_status(console.create("still fine")["secret"]) == 200
    # The proto3 JSON names work too, and a body that is not JSON is a 400 as well.
    rotated = console.call(
        "POST", f"{keys}/{key_id}:rotate", {"gracePeriod": "60s"}, token=console.token()
    )
    assert rotated.status == 200, rotated.body
    assert rotated.json()["previous"]["expires_at"]
    broken = console.stack.request(
        keys,
        headers={"Authorization": f"Bearer {console.token()}", "Content-Type": "application/json"},
        body=b"{not json",
    )
    assert broken.status == 400
