"""A tiny OpenAI-compatible upstream for demos and end-to-end tests (stdlib only).

Run it with `python -m demo.upstream --host 127.0.0.1 --port 8000`; it prints one line,
"demo upstream listening on http://HOST:PORT", and exits 0 on SIGTERM or SIGINT.

Endpoints:
- `GET /v1/models`: one model, `demo-model`.
- `POST /v1/chat/completions`: a `chat.completion` (or `chat.completion.chunk` events).
- `POST /v1/completions`: a `text_completion` (or its streamed chunks).
- `GET /_demo/requests`: what reached the upstream, oldest first (method, path, headers with
  lowercased names, body length, status); `DELETE /_demo/requests` forgets it. Requests to
  `/_demo/` paths are not recorded themselves. At most `--max-recorded` entries are kept.

Token counts are deterministic so tests can assert exact usage numbers:
- prompt_tokens = ceil(request body bytes / 4);
- completion_tokens = the `x-demo-completion-tokens: N` header if sent (0..1000000), else the
  first of `max_completion_tokens`, `max_tokens` that is present (a positive integer), capped at
  64, else 16;
- total_tokens = prompt_tokens + completion_tokens.
The reply text is always DEMO_REPLY, whatever the token counts say.

Scripting: `x-demo-model-suffix: -2024-08-06` answers with the requested model's name plus that
suffix (up to 32 characters), as real providers answer `gpt-4o` with `gpt-4o-2024-08-06`.
`x-demo-status: NNN` (400..599) makes any /v1 endpoint answer with that status and
an OpenAI-shaped error body without usage. Streaming (`"stream": true`) answers
`text/event-stream`, chunked on HTTP/1.1 (close-delimited on HTTP/1.0), and ends with a
usage-only chunk (`"choices": []`) when `stream_options.include_usage` is true, then
`data: [DONE]`. Bad JSON is a 400 and an unknown path a 404, both OpenAI-shaped.

Request headers are never logged (they carry API keys); with logging on, each request gets one
stderr line: method, path without query, status.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Literal
from urllib.parse import urlsplit

DEMO_MODEL = "demo-model"
DEMO_REPLY = "This is a deterministic reply from the demo upstream."
DEFAULT_COMPLETION_TOKENS = 16
MAX_COMPLETION_TOKENS = 64
MAX_SCRIPTED_COMPLETION_TOKENS = 1_000_000
COMPLETION_TOKENS_HEADER = "x-demo-completion-tokens"
STATUS_HEADER = "x-demo-status"
MODEL_SUFFIX_HEADER = "x-demo-model-suffix"
MAX_MODEL_SUFFIX = 32
DEFAULT_MAX_RECORDED = 1000
MAX_BODY_BYTES = 16 * 1024 * 1024
RECORDED_REQUESTS_PATH = "/_demo/requests"
SHUTDOWN_POLL_SECONDS = 0.05  # how long serve_forever may take to notice shutdown()

Kind = Literal["chat", "text"]
JsonObject = dict[str, object]

_COMPLETION_ROUTES: dict[str, Kind] = {"/v1/chat/completions": "chat", "/v1/completions": "text"}
_ROUTES: dict[str, frozenset[str]] = {
    "/v1/models": frozenset({"GET"}),
    "/v1/chat/completions": frozenset({"POST"}),
    "/v1/completions": frozenset({"POST"}),
    RECORDED_REQUESTS_PATH: frozenset({"GET", "DELETE"}),
}


class DemoError(Exception):
    """A request the demo answers with an OpenAI-shaped error instead of a completion."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        """Keep what the error body and status line need."""
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.param = param
        self.code = code

    def body(self) -> JsonObject:
        """The `{"error": {...}}` body OpenAI clients expect."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass(frozen=True)
class RecordedRequest:
    """What one request looked like when it reached the upstream."""

    method: str
    path: str
    headers: dict[str, str]
    body_length: int
    status: int


class RequestLog:
    """A bounded, thread-safe list of recent requests, so tests can see what Envoy forwarded."""

    def __init__(self, max_entries: int = DEFAULT_MAX_RECORDED) -> None:
        """Keep at most `max_entries`, dropping the oldest first."""
        self._entries: deque[RecordedRequest] = deque(maxlen=max_entries)
        self._lock = threading.Lock()

    def record(self, entry: RecordedRequest) -> None:
        """Append one request."""
        with self._lock:
            self._entries.append(entry)

    def snapshot(self) -> list[RecordedRequest]:
        """All kept requests, oldest first."""
        with self._lock:
            return list(self._entries)

    def clear(self) -> int:
        """Forget everything; return how many entries there were."""
        with self._lock:
            count = len(self._entries)
            self._entries.clear()
            return count


def prompt_tokens(body: bytes) -> int:
    """ceil(len(body) / 4): a fixed stand-in for a tokenizer that tests can compute."""
    return (len(body) + 3) // 4


def completion_tokens(payload: Mapping[str, object], override: str | None) -> int:
    """The completion token count the docstring promises (header, then max_*, then 16)."""
    if override is not None:
        try:
            value = int(override.strip())
        except ValueError:
            value = -1
        if not 0 <= value <= MAX_SCRIPTED_COMPLETION_TOKENS:
            raise DemoError(
                400,
                f"{COMPLETION_TOKENS_HEADER} must be an integer "
                f"0..{MAX_SCRIPTED_COMPLETION_TOKENS}",
            )
        return value
    for field in ("max_completion_tokens", "max_tokens"):
        requested = payload.get(field)
        if requested is None:
            continue
        if not isinstance(requested, int) or isinstance(requested, bool) or requested < 1:
            raise DemoError(400, f"{field} must be a positive integer", param=field)
        return min(requested, MAX_COMPLETION_TOKENS)
    return DEFAULT_COMPLETION_TOKENS


def scripted_status(value: str | None) -> int | None:
    """The error status a test asked for with `x-demo-status`, if any."""
    if value is None:
        return None
    try:
        status = int(value.strip())
    except ValueError:
        status = 0
    if not 400 <= status <= 599:
        raise DemoError(400, f"{STATUS_HEADER} must be an HTTP error status 400..599")
    return status


def scripted_error(status: int) -> DemoError:
    """The OpenAI-shaped error (no usage) a scripted status answers with."""
    return DemoError(
        status,
        f"scripted failure ({STATUS_HEADER}: {status})",
        error_type="server_error" if status >= 500 else "invalid_request_error",
        code="demo_scripted_status",
    )


def parse_payload(body: bytes) -> JsonObject:
    """The JSON object of a completion request, or a 400 like OpenAI's."""
    try:
        payload: object = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DemoError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise DemoError(400, "request body must be a JSON object")
    return payload


def requested_model(payload: Mapping[str, object]) -> str:
    """Echo the requested model, as real upstreams do, or fall back to demo-model."""
    model = payload.get("model")
    return model if isinstance(model, str) and model else DEMO_MODEL


def answered_model(payload: Mapping[str, object], suffix: str | None) -> str:
    """The model the reply names: the requested one, dated when a test asks for it."""
    if suffix is None:
        return requested_model(payload)
    if len(suffix) > MAX_MODEL_SUFFIX or not suffix.isprintable():
        raise DemoError(400, f"{MODEL_SUFFIX_HEADER} must be at most {MAX_MODEL_SUFFIX} characters")
    return requested_model(payload) + suffix


def wants_stream(payload: Mapping[str, object]) -> tuple[bool, bool]:
    """(stream?, include a usage chunk?) from `stream` and `stream_options.include_usage`."""
    options = payload.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    return payload.get("stream") is True, include_usage


def models_body() -> JsonObject:
    """The `GET /v1/models` list."""
    return {
        "object": "list",
        "data": [{"id": DEMO_MODEL, "object": "model", "created": 0, "owned_by": "demo"}],
    }


def usage_body(prompt: int, completion: int) -> JsonObject:
    """OpenAI's usage object."""
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


@dataclass(frozen=True)
class Completion:
    """Everything a completion response says, fixed before any byte is written."""

    kind: Kind
    completion_id: str
    created: int
    model: str
    prompt_tokens: int
    completion_tokens: int

    @property
    def usage(self) -> JsonObject:
        """The usage object for this completion."""
        return usage_body(self.prompt_tokens, self.completion_tokens)

    def body(self) -> JsonObject:
        """The non-streamed response body."""
        if self.kind == "chat":
            choice: JsonObject = {
                "index": 0,
                "message": {"role": "assistant", "content": DEMO_REPLY},
                "finish_reason": "stop",
            }
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": DEMO_REPLY, "logprobs": None, "finish_reason": "stop"}
            obj = "text_completion"
        return {**self._envelope(obj), "choices": [choice], "usage": self.usage}

    def chunks(self, *, include_usage: bool) -> list[JsonObject]:
        """The streamed events: one per word, a finishing chunk, then usage if asked for."""
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        words = DEMO_REPLY.split(" ")
        pieces = [words[0], *(f" {word}" for word in words[1:])]
        choices: list[JsonObject] = []
        if self.kind == "chat":
            choices.append(_chat_choice({"role": "assistant", "content": ""}, None))
            choices.extend(_chat_choice({"content": piece}, None) for piece in pieces)
            choices.append(_chat_choice({}, "stop"))
        else:
            choices.extend(_text_choice(piece, None) for piece in pieces)
            choices.append(_text_choice("", "stop"))
        # With include_usage, OpenAI sends "usage": null on every chunk but the last.
        extra: JsonObject = {"usage": None} if include_usage else {}
        events = [{**self._envelope(obj), "choices": [choice], **extra} for choice in choices]
        if include_usage:
            events.append({**self._envelope(obj), "choices": [], "usage": self.usage})
        return events

    def _envelope(self, obj: str) -> JsonObject:
        return {
            "id": self.completion_id,
            "object": obj,
            "created": self.created,
            "model": self.model,
        }


def _chat_choice(delta: JsonObject, finish_reason: str | None) -> JsonObject:
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def _text_choice(text: str, finish_reason: str | None) -> JsonObject:
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}


def build_completion(
    kind: Kind,
    payload: Mapping[str, object],
    *,
    body: bytes,
    headers: Mapping[str, str],
    now: float,
) -> Completion:
    """Decide the whole completion from the request; pure, so tests can call it directly."""
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    return Completion(
        kind=kind,
        completion_id=f"{prefix}-{uuid.uuid4().hex[:24]}",
        created=int(now),
        model=answered_model(payload, headers.get(MODEL_SUFFIX_HEADER)),
        prompt_tokens=prompt_tokens(body),
        completion_tokens=completion_tokens(payload, headers.get(COMPLETION_TOKENS_HEADER)),
    )


def sse_event(data: JsonObject | str) -> bytes:
    """One server-sent event carrying JSON (or the literal [DONE])."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


class DemoUpstreamServer(ThreadingHTTPServer):
    """The HTTP server plus the state its handlers share (the request log, the clock)."""

    daemon_threads = True
    # socketserver's default backlog of 5 refused connections in a burst through Envoy (a 503
    # for the client); the kernel caps this at net.core.somaxconn.
    request_queue_size = 4096

    def __init__(
        self,
        address: tuple[str, int],
        *,
        max_recorded: int = DEFAULT_MAX_RECORDED,
        log_requests: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Bind `address` (port 0 picks a free one); serve with `serve_forever()`."""
        super().__init__(address, DemoUpstreamHandler)
        self.request_log = RequestLog(max_recorded)
        self.log_requests = log_requests
        self.clock = clock

    @property
    def host(self) -> str:
        """The bound address."""
        host = self.server_address[0]
        return host.decode() if isinstance(host, bytes | bytearray) else host

    @property
    def port(self) -> int:
        """The bound port (the real one when asked for port 0)."""
        return self.server_address[1]

    @property
    def url(self) -> str:
        """Base URL clients use, e.g. http://127.0.0.1:8000."""
        return f"http://{self.host}:{self.port}"


class DemoUpstreamHandler(BaseHTTPRequestHandler):
    """Routes one request; HTTP/1.1 with keep-alive so Envoy can reuse connections."""

    protocol_version = "HTTP/1.1"
    server_version = "authz-demo-upstream"

    def do_GET(self) -> None:
        """Dispatch GET."""
        self._handle()

    def do_POST(self) -> None:
        """Dispatch POST."""
        self._handle()

    def do_DELETE(self) -> None:
        """Dispatch DELETE."""
        self._handle()

    def do_PUT(self) -> None:
        """Dispatch PUT (only to answer 405/404 in OpenAI's shape)."""
        self._handle()

    def do_PATCH(self) -> None:
        """Dispatch PATCH (only to answer 405/404 in OpenAI's shape)."""
        self._handle()

    @property
    def demo(self) -> DemoUpstreamServer:
        """The server, typed."""
        assert isinstance(self.server, DemoUpstreamServer)
        return self.server

    def _handle(self) -> None:
        path = urlsplit(self.path).path
        headers = _lowercase_headers(self.headers.items())
        try:
            body = self._read_body(headers)
        except DemoError as error:
            self.close_connection = True  # the rest of the body is still on the wire
            self._send_json(error.status, error.body(), path=path, headers=headers, body=b"")
            return
        try:
            self._route(path, headers, body)
        except DemoError as error:
            self._send_json(error.status, error.body(), path=path, headers=headers, body=body)

    def _route(self, path: str, headers: Mapping[str, str], body: bytes) -> None:
        methods = _ROUTES.get(path)
        if methods is None:
            raise DemoError(404, f"unknown path {path}", code="unknown_url")
        if self.command not in methods:
            raise DemoError(405, f"{self.command} not allowed on {path}", code="method_not_allowed")
        if path == RECORDED_REQUESTS_PATH:
            self._recorded_requests()
            return
        status = scripted_status(headers.get(STATUS_HEADER))
        if status is not None:
            raise scripted_error(status)
        kind = _COMPLETION_ROUTES.get(path)
        if kind is None:
            self._send_json(200, models_body(), path=path, headers=headers, body=body)
            return
        payload = parse_payload(body)
        completion = build_completion(
            kind, payload, body=body, headers=headers, now=self.demo.clock()
        )
        stream, include_usage = wants_stream(payload)
        if stream:
            self._record(path, headers, body, 200)
            self._send_stream(completion.chunks(include_usage=include_usage))
        else:
            self._send_json(200, completion.body(), path=path, headers=headers, body=body)

    def _recorded_requests(self) -> None:
        if self.command == "DELETE":
            self.demo.request_log.clear()
            self.send_response(HTTPStatus.NO_CONTENT)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        entries = [asdict(entry) for entry in self.demo.request_log.snapshot()]
        self._write_json(200, entries)

    def _read_body(self, headers: Mapping[str, str]) -> bytes:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return self._read_chunked_body()
        raw_length = headers.get("content-length", "0").strip() or "0"
        if not raw_length.isdigit():
            raise DemoError(400, "invalid Content-Length")
        length = int(raw_length)
        if length > MAX_BODY_BYTES:
            raise DemoError(413, f"request body over {MAX_BODY_BYTES} bytes")
        return self.rfile.read(length)

    def _read_chunked_body(self) -> bytes:
        """Decode a chunked request body (Envoy may forward bodies without a length)."""
        parts: list[bytes] = []
        total = 0
        while True:
            size_line = self.rfile.readline(1024).split(b";", 1)[0].strip()
            try:
                size = int(size_line, 16)
            except ValueError:
                raise DemoError(400, "invalid chunked request body") from None
            if size == 0:
                break
            total += size
            if total > MAX_BODY_BYTES:
                raise DemoError(413, f"request body over {MAX_BODY_BYTES} bytes")
            parts.append(self.rfile.read(size))
            self.rfile.readline(1024)
        while self.rfile.readline(8192).strip():
            pass  # trailers: nothing here needs them
        return b"".join(parts)

    def _record(self, path: str, headers: Mapping[str, str], body: bytes, status: int) -> None:
        """Remember the request before answering, so a client that got the answer sees it."""
        if path.startswith("/_demo/"):
            return
        entry = RecordedRequest(
            method=self.command,
            path=self.path,
            headers=dict(headers),
            body_length=len(body),
            status=status,
        )
        self.demo.request_log.record(entry)

    def _send_json(
        self,
        status: int,
        payload: object,
        *,
        path: str,
        headers: Mapping[str, str],
        body: bytes,
    ) -> None:
        self._record(path, headers, body, status)
        self._write_json(status, payload)

    def _write_json(self, status: int, payload: object) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _send_stream(self, events: Iterable[JsonObject]) -> None:
        """Server-sent events: chunked on HTTP/1.1, close-delimited for HTTP/1.0 clients."""
        chunked = self.request_version == "HTTP/1.1"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.close_connection = True
            self.send_header("Connection", "close")
        self.end_headers()
        try:
            for event in events:
                self._write_stream_part(sse_event(event), chunked=chunked)
            self._write_stream_part(sse_event("[DONE]"), chunked=chunked)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away mid-stream

    def _write_stream_part(self, data: bytes, *, chunked: bool) -> None:
        if chunked:
            data = f"{len(data):x}\r\n".encode() + data + b"\r\n"
        self.wfile.write(data)
        self.wfile.flush()

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """One line per request, no headers and no query string (either may hold secrets)."""
        if self.demo.log_requests:
            path = urlsplit(self.path).path if hasattr(self, "path") else "-"
            sys.stderr.write(f"{self.command or '-'} {path} {code}\n")

    def log_message(self, format: str, *args: object) -> None:
        """Silence the stdlib's other messages: they quote the raw request line."""


def _lowercase_headers(items: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Headers by lowercased name; repeated headers joined with ", " as HTTP allows."""
    headers: dict[str, str] = {}
    for name, value in items:
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return headers


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m demo.upstream",
        description="OpenAI-compatible demo upstream with deterministic token usage.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind; 0 picks a free one")
    parser.add_argument(
        "--max-recorded",
        type=int,
        default=DEFAULT_MAX_RECORDED,
        help="how many requests GET /_demo/requests remembers",
    )
    parser.add_argument("--quiet", action="store_true", help="do not log one line per request")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT, then close the socket and return 0."""
    args = _parse_args(argv)
    server = DemoUpstreamServer(
        (args.host, args.port), max_recorded=args.max_recorded, log_requests=not args.quiet
    )
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    serving = threading.Thread(
        target=server.serve_forever,
        args=(SHUTDOWN_POLL_SECONDS,),
        name="demo-upstream",
        daemon=True,
    )
    serving.start()
    print(f"demo upstream listening on {server.url}", flush=True)
    stop.wait()
    server.shutdown()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
