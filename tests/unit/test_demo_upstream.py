"""The demo upstream answers like OpenAI, with usage numbers tests can predict exactly."""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from demo.upstream import (
    DEMO_MODEL,
    DEMO_REPLY,
    SHUTDOWN_POLL_SECONDS,
    DemoError,
    DemoUpstreamServer,
    completion_tokens,
    prompt_tokens,
)
from tests.support.procs import ManagedProcess, free_port

NOW = 1_700_000_000.0
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Reply:
    """What a client saw."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> dict[str, object]:
        payload = json.loads(self.body)
        assert isinstance(payload, dict)
        return payload


@contextlib.contextmanager
def serving(server: DemoUpstreamServer) -> Iterator[DemoUpstreamServer]:
    """Serve in a thread for the duration of the block."""
    thread = threading.Thread(
        target=server.serve_forever, args=(SHUTDOWN_POLL_SECONDS,), daemon=True
    )
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def upstream() -> Iterator[DemoUpstreamServer]:
    with serving(DemoUpstreamServer(("127.0.0.1", 0), clock=lambda: NOW)) as server:
        yield server


def call(
    server: DemoUpstreamServer,
    path: str,
    *,
    method: str = "GET",
    payload: object = None,
    data: bytes | None = None,
    headers: Mapping[str, str] | None = None,
) -> Reply:
    """Send one request with urllib; error statuses are returned, not raised."""
    if payload is not None:
        data = json.dumps(payload).encode()
    request = urllib.request.Request(
        server.url + path,
        data=data,
        method=method,
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return Reply(response.status, dict(response.headers.items()), response.read())
    except urllib.error.HTTPError as error:
        with error:
            return Reply(error.code, dict(error.headers.items()), error.read())


def sse_payloads(body: bytes) -> list[str]:
    """The `data:` payloads of an event stream, in order."""
    events = body.decode().split("\n\n")
    assert events[-1] == ""
    payloads = []
    for event in events[:-1]:
        assert event.startswith("data: ")
        payloads.append(event.removeprefix("data: "))
    return payloads


def test_token_rules() -> None:
    assert prompt_tokens(b"") == 0
    assert prompt_tokens(b"abcd") == 1
    assert prompt_tokens(b"abcde") == 2
    assert completion_tokens({}, None) == 16
    assert completion_tokens({"max_tokens": 5}, None) == 5
    assert completion_tokens({"max_completion_tokens": 7, "max_tokens": 5}, None) == 7
    assert completion_tokens({"max_tokens": 500}, None) == 64
    assert completion_tokens({"max_tokens": 500}, "300") == 300
    assert completion_tokens({}, "0") == 0
    for bad in ({"max_tokens": 0}, {"max_tokens": "5"}, {"max_tokens": True}):
        with pytest.raises(DemoError):
            completion_tokens(bad, None)
    with pytest.raises(DemoError):
        completion_tokens({}, "many")


def test_models(upstream: DemoUpstreamServer) -> None:
    reply = call(upstream, "/v1/models")
    assert reply.status == 200
    assert reply.json() == {
        "object": "list",
        "data": [{"id": DEMO_MODEL, "object": "model", "created": 0, "owned_by": "demo"}],
    }


def test_chat_completion_with_deterministic_usage(upstream: DemoUpstreamServer) -> None:
    payload = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
    body = json.dumps(payload).encode()
    reply = call(upstream, "/v1/chat/completions", method="POST", data=body)
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "application/json"
    result = reply.json()
    assert str(result["id"]).startswith("chatcmpl-")
    assert result["object"] == "chat.completion"
    assert result["created"] == int(NOW)
    assert result["model"] == "gpt-test"
    assert result["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": DEMO_REPLY},
            "finish_reason": "stop",
        }
    ]
    prompt = (len(body) + 3) // 4
    assert result["usage"] == {
        "prompt_tokens": prompt,
        "completion_tokens": 16,
        "total_tokens": prompt + 16,
    }


@pytest.mark.parametrize(
    ("extra", "headers", "expected"),
    [
        ({"max_tokens": 5}, {}, 5),
        ({"max_completion_tokens": 1000}, {}, 64),
        ({"max_tokens": 5}, {"x-demo-completion-tokens": "1234"}, 1234),
    ],
)
def test_completion_token_count_follows_request(
    upstream: DemoUpstreamServer, extra: dict[str, int], headers: dict[str, str], expected: int
) -> None:
    reply = call(
        upstream,
        "/v1/chat/completions",
        method="POST",
        payload={"messages": [], **extra},
        headers=headers,
    )
    usage = reply.json()["usage"]
    assert isinstance(usage, dict)
    assert usage["completion_tokens"] == expected
    assert reply.json()["model"] == DEMO_MODEL


def test_text_completion_shape(upstream: DemoUpstreamServer) -> None:
    body = json.dumps({"model": "m", "prompt": "say hi", "max_tokens": 3}).encode()
    result = call(upstream, "/v1/completions", method="POST", data=body).json()
    assert str(result["id"]).startswith("cmpl-")
    assert result["object"] == "text_completion"
    assert result["choices"] == [
        {"index": 0, "text": DEMO_REPLY, "logprobs": None, "finish_reason": "stop"}
    ]
    prompt = (len(body) + 3) // 4
    assert result["usage"] == {
        "prompt_tokens": prompt,
        "completion_tokens": 3,
        "total_tokens": prompt + 3,
    }


def test_stream_with_usage(upstream: DemoUpstreamServer) -> None:
    payload = {"messages": [], "stream": True, "stream_options": {"include_usage": True}}
    body = json.dumps(payload).encode()
    reply = call(
        upstream,
        "/v1/chat/completions",
        method="POST",
        data=body,
        headers={"x-demo-completion-tokens": "9"},
    )
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "text/event-stream"
    assert reply.headers["Transfer-Encoding"] == "chunked"
    payloads = sse_payloads(reply.body)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(text) for text in payloads[:-1]]
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert len({chunk["id"] for chunk in chunks}) == 1
    content = "".join(
        chunk["choices"][0]["delta"].get("content", "") for chunk in chunks if chunk["choices"]
    )
    assert content == DEMO_REPLY
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert all(chunk["usage"] is None for chunk in chunks[:-1])
    prompt = (len(body) + 3) // 4
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {
        "prompt_tokens": prompt,
        "completion_tokens": 9,
        "total_tokens": prompt + 9,
    }


def test_stream_without_usage(upstream: DemoUpstreamServer) -> None:
    reply = call(
        upstream, "/v1/completions", method="POST", payload={"prompt": "x", "stream": True}
    )
    payloads = sse_payloads(reply.body)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(text) for text in payloads[:-1]]
    assert all("usage" not in chunk and chunk["choices"] for chunk in chunks)
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == DEMO_REPLY


def test_keep_alive_survives_a_stream(upstream: DemoUpstreamServer) -> None:
    """Chunked framing must be exact, or the next request on the connection breaks."""
    connection = http.client.HTTPConnection(upstream.host, upstream.port, timeout=5)
    try:
        body = json.dumps({"stream": True, "stream_options": {"include_usage": True}})
        connection.request("POST", "/v1/chat/completions", body=body)
        first = connection.getresponse()
        assert sse_payloads(first.read())[-1] == "[DONE]"
        connection.request("GET", "/v1/models")
        second = connection.getresponse()
        assert second.status == 200
        assert json.loads(second.read())["data"][0]["id"] == DEMO_MODEL
    finally:
        connection.close()


def test_stream_to_http_1_0_client_is_close_delimited(upstream: DemoUpstreamServer) -> None:
    body = json.dumps({"prompt": "x", "stream": True}).encode()
    request = (
        b"POST /v1/completions HTTP/1.0\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
    with socket.create_connection((upstream.host, upstream.port), timeout=5) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, stream = received.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head
    assert sse_payloads(stream)[-1] == "[DONE]"


def test_chunked_request_body_is_read(upstream: DemoUpstreamServer) -> None:
    parts = [b'{"messages": [], ', b'"max_tokens": 2}']
    connection = http.client.HTTPConnection(upstream.host, upstream.port, timeout=5)
    try:
        connection.request("POST", "/v1/chat/completions", body=iter(parts), encode_chunked=True)
        result = json.loads(connection.getresponse().read())
    finally:
        connection.close()
    length = sum(len(part) for part in parts)
    assert result["usage"]["prompt_tokens"] == (length + 3) // 4
    assert result["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("status", [500, 429, 503])
def test_scripted_status_has_error_body_without_usage(
    upstream: DemoUpstreamServer, status: int
) -> None:
    reply = call(
        upstream,
        "/v1/chat/completions",
        method="POST",
        payload={"messages": [], "stream": True},
        headers={"x-demo-status": str(status)},
    )
    assert reply.status == status
    result = reply.json()
    assert set(result) == {"error"}
    error = result["error"]
    assert isinstance(error, dict)
    assert error["code"] == "demo_scripted_status"


@pytest.mark.parametrize(
    ("path", "method", "data", "headers", "status"),
    [
        ("/v1/chat/completions", "POST", b"{not json", {}, 400),
        ("/v1/chat/completions", "POST", b"[1, 2]", {}, 400),
        ("/v1/chat/completions", "POST", b"{}", {"x-demo-status": "200"}, 400),
        ("/v1/chat/completions", "POST", b"{}", {"x-demo-completion-tokens": "-1"}, 400),
        ("/v1/chat/completions", "POST", b'{"max_tokens": "x"}', {}, 400),
        ("/v1/embeddings", "POST", b"{}", {}, 404),
        ("/nothing/here", "GET", None, {}, 404),
        ("/v1/chat/completions", "GET", None, {}, 405),
    ],
)
def test_errors_are_openai_shaped(
    upstream: DemoUpstreamServer,
    path: str,
    method: str,
    data: bytes | None,
    headers: dict[str, str],
    status: int,
) -> None:
    reply = call(upstream, path, method=method, data=data, headers=headers)
    assert reply.status == status
    error = reply.json()["error"]
    assert isinstance(error, dict)
    assert isinstance(error["message"], str)
    assert set(error) == {"message", "type", "param", "code"}


def test_requests_are_recorded_and_cleared(upstream: DemoUpstreamServer) -> None:
    body = json.dumps({"messages": []}).encode()
    call(
        upstream,
        "/v1/chat/completions?trace=1",
        method="POST",
        data=body,
        headers={"X-Workspace-Id": "ws-1", "Authorization": "Bearer sk-test"},
    )
    call(upstream, "/v1/models", headers={"x-demo-status": "502"})

    recorded = json.loads(call(upstream, "/_demo/requests").body)
    assert [(r["method"], r["path"], r["status"]) for r in recorded] == [
        ("POST", "/v1/chat/completions?trace=1", 200),
        ("GET", "/v1/models", 502),
    ]
    first = recorded[0]
    assert first["body_length"] == len(body)
    assert first["headers"]["x-workspace-id"] == "ws-1"
    assert first["headers"]["authorization"] == "Bearer sk-test"
    assert all(name == name.lower() for name in first["headers"])

    assert call(upstream, "/_demo/requests", method="DELETE").status == 204
    assert json.loads(call(upstream, "/_demo/requests").body) == []


def test_recorded_requests_are_bounded() -> None:
    with serving(DemoUpstreamServer(("127.0.0.1", 0), max_recorded=2)) as running:
        for index in range(3):
            call(running, f"/v1/models?n={index}")
        recorded = json.loads(call(running, "/_demo/requests").body)
        assert [entry["path"] for entry in recorded] == ["/v1/models?n=1", "/v1/models?n=2"]


def test_cli_serves_logs_without_headers_and_exits_cleanly_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    command = [sys.executable, "-m", "demo.upstream", "--host", "127.0.0.1"]
    with ManagedProcess(
        [*command, "--port", str(port)],
        log_dir=tmp_path,
        name="upstream",
        env={"PYTHONPATH": str(REPO_ROOT)},
        cwd=REPO_ROOT,
    ) as process:
        process.wait_for_port(port, timeout=10)
        server_url = f"http://127.0.0.1:{port}"
        request = urllib.request.Request(
            f"{server_url}/v1/chat/completions?api_key=sk-in-query",
            data=b'{"messages": []}',
            headers={"Authorization": "Bearer sk-secret-value"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        assert process.stop() == 0  # stopping a process that already exited is fine
    log = process.read_log()
    assert log.splitlines()[0] == f"demo upstream listening on {server_url}"
    assert "POST /v1/chat/completions 200" in log
    assert "sk-" not in log


def test_cli_exits_cleanly_on_sigint(tmp_path: Path) -> None:
    with ManagedProcess(
        [sys.executable, "-m", "demo.upstream", "--port", "0", "--quiet"],
        log_dir=tmp_path,
        env={"PYTHONPATH": str(REPO_ROOT)},
        cwd=REPO_ROOT,
    ) as process:
        _wait_for_log_line(process, "demo upstream listening on http://127.0.0.1:")
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0


def _wait_for_log_line(process: ManagedProcess, prefix: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if any(line.startswith(prefix) for line in process.read_log().splitlines()):
            return
        assert process.is_running(), process.read_log()
        time.sleep(0.02)
    raise AssertionError(f"no line starting with {prefix!r}:\n{process.read_log()}")


def test_model_suffix_answers_with_a_dated_model_name(upstream: DemoUpstreamServer) -> None:
    payload = {"model": "gpt-4o", "stream": True, "stream_options": {"include_usage": True}}
    dated = {"x-demo-model-suffix": "-2024-08-06"}
    plain = call(upstream, "/v1/chat/completions", method="POST", payload={"model": "gpt-4o"})
    assert plain.json()["model"] == "gpt-4o"
    reply = call(upstream, "/v1/chat/completions", method="POST", payload=payload, headers=dated)
    chunks = [json.loads(p) for p in sse_payloads(reply.body)[:-1]]
    assert {c["model"] for c in chunks} == {"gpt-4o-2024-08-06"}
    too_long = call(
        upstream,
        "/v1/chat/completions",
        method="POST",
        payload=payload,
        headers={"x-demo-model-suffix": "x" * 33},
    )
    assert too_long.status == 400
