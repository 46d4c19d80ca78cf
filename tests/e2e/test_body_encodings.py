"""CONTRACT §3 sizing through real Envoy, with `pack_as_bytes` on (our configs) and off (Envoy's
default, and Istio's): the body is read either way, and a body Envoy cut at
`max_request_bytes` (65,536) is sized from content-length whatever the partial flag says."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator

import pytest

from tests.e2e.conftest import build_stack
from tests.e2e.test_envoy_contract import auth, new_key
from tests.support.stack import Stack

pytestmark = pytest.mark.e2e

TPM = 10_000_000
DEFAULT_COMPLETION = 256


@pytest.fixture(scope="module", params=[True, False], ids=["pack_as_bytes", "body_string"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    log_dir = tmp_path_factory.mktemp("encodings")
    yield from build_stack(
        log_dir, f"sqlite:///{log_dir / 'authz.db'}", pack_as_bytes=request.param
    )


def chat_of_size(size: int, max_tokens: int) -> bytes:
    head = {"model": "demo-model", "max_tokens": max_tokens, "messages": [{"role": "user"}]}
    prefix = json.dumps(head)[:-3] + ', "content": "'
    suffix = '"}]}'
    body = (prefix + "a" * (size - len(prefix) - len(suffix)) + suffix).encode()
    assert len(body) == size
    json.loads(body)
    return body


def test_max_tokens_in_the_body_is_read(stack: Stack) -> None:
    _, key = new_key(stack, tpm=1000)
    body = json.dumps({"model": "demo-model", "max_tokens": 5000, "messages": []}).encode()
    answer = stack.request("/v1/chat/completions", headers=auth(key["secret"]), body=body)
    assert answer.status == 429
    assert answer.json()["error"]["type"] == "tokens"


@pytest.mark.parametrize("size", [65_535, 65_536, 65_537])
def test_reservation_at_the_envoy_limit(stack: Stack, size: int) -> None:
    _, key = new_key(stack, tpm=TPM)
    answer = stack.request(
        "/v1/chat/completions", headers=auth(key["secret"]), body=chat_of_size(size, 10)
    )
    assert answer.status == 200
    # A complete body's own max_tokens counts; a cut one is sized from content-length with the
    # workspace's default completion (its max_tokens cannot be trusted).
    completion = 10 if size < 65_536 else DEFAULT_COMPLETION
    reserved = -(-size // 4) + completion
    assert int(answer.headers["x-ratelimit-remaining-tokens"]) == TPM - reserved


def test_a_large_body_cannot_pass_for_its_head(stack: Stack) -> None:
    _, key = new_key(stack, tpm=1_000_000)
    size = 5 * 1024 * 1024
    # Declare 5 MB and send only a head past Envoy's 65,536-byte buffer: Envoy asks the
    # sidecar then, and answers before the rest would be read (so the client never has to
    # push the whole body into a connection Envoy is closing).
    head = chat_of_size(size, 10)[:70_000]
    connection = http.client.HTTPConnection("127.0.0.1", stack.envoy_port, timeout=10)
    try:
        connection.putrequest("POST", "/v1/chat/completions")
        for name, value in auth(key["secret"]).items():
            connection.putheader(name, value)
        connection.putheader("Content-Length", str(size))
        connection.endheaders()
        connection.send(head)
        answer = connection.getresponse()
        status, body = answer.status, answer.read()
    finally:
        connection.close()
    assert status == 429
    error = json.loads(body)["error"]
    assert "Request too large" in error["message"]
    assert f"Requested {size // 4 + DEFAULT_COMPLETION}" in error["message"]
