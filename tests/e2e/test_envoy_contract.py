"""CONTRACT §2 as a client behind real Envoy sees it, on the embedded default."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from authz.keys import generate_key
from tests.support.stack import Stack, authz_cli, change_applied_after, wait_until

pytestmark = pytest.mark.e2e

CHAT = json.dumps({"model": "demo-model", "messages": [{"role": "user", "content": "hi"}]}).encode()


def new_key(stack: Stack, *, rpm: int = 600, tpm: int = 1_000_000) -> tuple[str, dict[str, str]]:
    workspace = authz_cli(
        stack.database_url,
        "workspace",
        "create",
        f"ws-{time.monotonic_ns()}",
        "--rpm",
        str(rpm),
        "--tpm",
        str(tpm),
    )
    key = authz_cli(
        stack.database_url, "key", "create", "--workspace", workspace["id"], "--label", "e2e"
    )
    return workspace["id"], key


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}


def assert_openai_error(body: bytes, code: str, error_type: str) -> dict[str, object]:
    parsed = json.loads(body)
    assert parsed["error"]["code"] == code
    assert parsed["error"]["type"] == error_type
    assert parsed["error"]["param"] is None
    return parsed["error"]  # type: ignore[no-any-return]


def test_valid_key_reaches_upstream_with_identity_and_without_authorization(
    embedded_stack: Stack,
) -> None:
    workspace_id, key = new_key(embedded_stack)
    headers = {**auth(key["secret"]), "X-Workspace-Id": "ws_spoofed", "X-Api-Key-Id": "key_spoofed"}
    answer = embedded_stack.request("/v1/chat/completions", headers=headers, body=CHAT)
    assert answer.status == 200
    assert answer.json()["usage"]["total_tokens"] > 0
    assert answer.headers["x-ratelimit-limit-requests"] == "600"
    assert answer.headers["x-ratelimit-remaining-requests"] == "599"
    received = embedded_stack.upstream_requests()[-1]["headers"]
    assert received["x-workspace-id"] == workspace_id
    assert received["x-api-key-id"] == key["id"]
    assert "authorization" not in received


def test_missing_key_is_401_with_openai_body(embedded_stack: Stack) -> None:
    answer = embedded_stack.request("/v1/models")
    assert answer.status == 401
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["www-authenticate"] == "Bearer"
    assert_openai_error(answer.body, "missing_api_key", "invalid_request_error")


def test_wrong_key_is_401_invalid_api_key(embedded_stack: Stack) -> None:
    wrong = generate_key()
    answer = embedded_stack.request("/v1/models", headers=auth(wrong))
    assert answer.status == 401
    assert answer.headers["www-authenticate"] == "Bearer"
    error = assert_openai_error(answer.body, "invalid_api_key", "invalid_request_error")
    assert wrong not in answer.body.decode()
    assert wrong[:5] + "*" * 10 + wrong[-4:] in str(error["message"])


def test_key_in_url_is_400(embedded_stack: Stack) -> None:
    _, key = new_key(embedded_stack)
    answer = embedded_stack.request(
        f"/v1/models?api_key={key['secret']}", headers=auth(key["secret"])
    )
    assert answer.status == 400
    assert_openai_error(answer.body, "api_key_in_url", "invalid_request_error")
    assert key["secret"] not in answer.body.decode()


def test_revoked_key_gets_the_unknown_key_answer_within_one_second(embedded_stack: Stack) -> None:
    _, key = new_key(embedded_stack)
    assert embedded_stack.request("/v1/models", headers=auth(key["secret"])).status == 200
    unknown = generate_key()
    done = authz_cli(embedded_stack.database_url, "key", "revoke", key["id"])
    wait_until(
        lambda: embedded_stack.request("/v1/models", headers=auth(key["secret"])).status == 401,
        timeout=10,
        what="revocation",
    )
    # From the commit to the sidecar applying it, by the sidecar's own log line.
    assert change_applied_after(embedded_stack.sidecar, "key", done["revoked_at"]) < 1.0
    revoked = embedded_stack.request("/v1/models", headers=auth(key["secret"]))
    fresh = embedded_stack.request("/v1/models", headers=auth(unknown))
    # Same shape, same headers; only the mask differs, as each names its own key.
    assert revoked.body.replace(key["mask"].encode(), b"MASK") == fresh.body.replace(
        (unknown[:5] + "*" * 10 + unknown[-4:]).encode(), b"MASK"
    )


def test_rpm_burst_then_429_with_openai_headers(embedded_stack: Stack) -> None:
    _, key = new_key(embedded_stack, rpm=5)
    statuses = [
        embedded_stack.request("/v1/models", headers=auth(key["secret"])).status for _ in range(5)
    ]
    assert statuses == [200] * 5
    denied = embedded_stack.request("/v1/models", headers=auth(key["secret"]))
    assert denied.status == 429
    assert denied.headers["retry-after"] == "12"
    assert denied.headers["x-ratelimit-limit-requests"] == "5"
    assert denied.headers["x-ratelimit-remaining-requests"] == "0"
    assert_openai_error(denied.body, "rate_limit_exceeded", "requests")


def test_nothing_printed_holds_a_secret(embedded_stack: Stack) -> None:
    _, key = new_key(embedded_stack)
    embedded_stack.request("/v1/models", headers=auth(key["secret"]))
    embedded_stack.request("/v1/models?k=" + key["secret"], headers=auth(key["secret"]))
    embedded_stack.request("/v1/models", headers=auth(key["secret"][:-1] + "x"))
    logs = embedded_stack.all_logs()
    assert logs, "expected some output from the stack"
    assert key["secret"] not in logs
    assert key["secret"][8:] not in logs


def test_a_key_outside_authorization_never_reaches_the_upstream(embedded_stack: Stack) -> None:
    _, key = new_key(embedded_stack)
    headers = {**auth(key["secret"]), "X-Api-Key": key["secret"]}
    answer = embedded_stack.request("/v1/chat/completions", headers=headers, body=CHAT)
    assert answer.status == 200
    received = embedded_stack.upstream_requests()[-1]["headers"]
    assert "x-api-key" not in received
    assert key["secret"] not in json.dumps(embedded_stack.upstream_requests())
    assert embedded_stack.sidecar.metric("authz_forwarded_keys_stripped_total") >= 1


def test_a_double_encoded_key_in_the_url_is_400(embedded_stack: Stack) -> None:
    _, key = new_key(embedded_stack)
    encoded = key["secret"].replace("sk-", "sk%252D", 1)
    answer = embedded_stack.request(f"/v1/models?key={encoded}", headers=auth(key["secret"]))
    assert answer.status == 400
    assert_openai_error(answer.body, "api_key_in_url", "invalid_request_error")


def _sdk(stack: Stack, secret: str) -> Any:
    import openai

    # The SDK's defaults: it retries a 429 twice unless told `x-should-retry: false`.
    return openai.OpenAI(
        api_key=secret, base_url=f"http://127.0.0.1:{stack.envoy_port}/v1", max_retries=2
    )


def _checks(stack: Stack, code: str) -> float:
    """The SDK's attempts, as the sidecar counted them: one Check per HTTP request."""
    return stack.sidecar.metric("authz_checks_total", decision="deny", code=code)


def test_the_openai_sdk_does_not_retry_a_request_too_large(embedded_stack: Stack) -> None:
    import openai

    _, key = new_key(embedded_stack, tpm=1000)
    client = _sdk(embedded_stack, key["secret"])
    before = _checks(embedded_stack, "rate_limit_exceeded")
    with pytest.raises(openai.RateLimitError) as raised:
        client.chat.completions.create(
            model="demo-model", messages=[{"role": "user", "content": "hi"}], max_tokens=5000
        )
    assert raised.value.response.headers["x-should-retry"] == "false"
    assert "retry-after" not in raised.value.response.headers
    assert _checks(embedded_stack, "rate_limit_exceeded") - before == 1


def test_the_openai_sdk_does_not_retry_insufficient_quota(embedded_stack: Stack) -> None:
    import openai

    workspace_id, key = new_key(embedded_stack)
    authz_cli(
        embedded_stack.database_url,
        "workspace",
        "update",
        workspace_id,
        "--monthly-token-quota",
        "0",
    )
    client = _sdk(embedded_stack, key["secret"])
    wait_until(
        lambda: embedded_stack.request("/v1/models", headers=auth(key["secret"])).status == 429,
        timeout=5,
        what="the quota change reaches the sidecar",
    )
    before = _checks(embedded_stack, "insufficient_quota")
    with pytest.raises(openai.RateLimitError) as raised:
        client.models.list()
    assert raised.value.code == "insufficient_quota"
    assert raised.value.response.headers["x-should-retry"] == "false"
    assert _checks(embedded_stack, "insufficient_quota") - before == 1
