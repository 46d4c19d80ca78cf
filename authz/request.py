"""The one parse of a CheckRequest's HTTP request into the facts the decision needs. Pure.

The body is read once, from `raw_body` (Envoy's `pack_as_bytes: true`) or `body` (Envoy's
default, and Istio's), and JSON-parsed at most once. Nothing here raises on client input.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from envoy.service.auth.v3.attribute_context_pb2 import AttributeContext

from authz.keys import holds_live_key

PARTIAL_BODY_HEADER = "x-envoy-auth-partial-body"

MAX_PARSED_BODY_BYTES = 1 << 20
"""Bodies larger than this are not JSON-parsed (the default completion reservation applies):
parsing is on the request path and a multi-megabyte prompt would cost milliseconds."""

_MAX_CONTENT_LENGTH_DIGITS = 18
"""Longer `content-length` values are garbage (and would make `int()` slow or raise)."""

_MAX_TOKEN_FIELDS = ("max_completion_tokens", "max_tokens")
_MAX_MODEL_CHARS = 128

_BODILESS_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})
"""Listing and retrieval: nothing is generated, so no completion is reserved."""
_COMPLETION_ENDPOINTS = ("/chat/completions", "/completions", "/responses")
"""Paths (by their last segments) that generate: always the completion reservation."""
_PROMPT_ONLY_ENDPOINTS = ("/embeddings", "/moderations")
"""Paths (by their last segment) that read a prompt and generate no completion tokens."""


class Generation(Enum):
    """What a request may generate: it decides the completion reservation (contract §3)."""

    NOTHING = "nothing"
    """Bodiless, or listing/retrieval: no tokens reserved for a completion."""
    PROMPT_ONLY = "prompt_only"
    """Embeddings, moderations: the prompt estimate only."""
    COMPLETION = "completion"
    """Everything else: the prompt plus max_tokens (or the default), times n / best_of."""


@dataclass(frozen=True, slots=True)
class RequestSummary:
    """What one HTTP request asks for, as far as limits, prices and usage care."""

    body_bytes: int
    """The body's size as CONTRACT §3 defines it (for a cut body: max(buffered, length))."""
    cut: bool
    """Envoy forwarded only the head of the body (`max_request_bytes` reached)."""
    generation: Generation
    max_tokens: int | None = None
    """The top-level `max_completion_tokens` or `max_tokens`, if a positive integer."""
    choices: int = 1
    """The larger of the top-level `n` and `best_of` (each a positive integer), else 1."""
    model: str | None = None
    """The top-level `model` string (never a nested one)."""
    stream: bool = False
    include_usage: bool = False
    """`stream_options.include_usage` is true."""
    key_headers: tuple[str, ...] = ()
    """Headers other than `authorization` holding a live key: removed before the upstream."""


def parse_content_length(value: str | None) -> int | None:
    """A valid `content-length` (plain ASCII decimal digits), else None."""
    if value is None:
        return None
    value = value.strip()
    if not value or len(value) > _MAX_CONTENT_LENGTH_DIGITS:
        return None
    if not (value.isascii() and value.isdigit()):
        return None
    return int(value)


def request_body(http: AttributeContext.HttpRequest) -> bytes:
    """The buffered body, whichever field Envoy filled."""
    if http.raw_body:
        return bytes(http.raw_body)
    return http.body.encode("utf-8", "surrogatepass") if http.body else b""


def summarize(http: AttributeContext.HttpRequest, *, max_request_bytes: int) -> RequestSummary:
    """The request's summary; `max_request_bytes` is Envoy's `with_request_body` limit."""
    headers = http.headers
    body = request_body(http)
    content_length = parse_content_length(headers.get("content-length"))
    # Envoy stops buffering at max_request_bytes; at exactly that size it may still say
    # `partial: false`, so the size decides as well as the flag.
    cut = bool(body) and (
        len(body) >= max_request_bytes or headers.get(PARTIAL_BODY_HEADER) == "true"
    )
    if body:
        body_bytes = max(len(body), content_length or 0) if cut else len(body)
    else:
        body_bytes = content_length or 0
    generation = _generation(http.method, http.path, body_bytes, content_length)
    key_headers = headers_holding_keys(headers)
    document = None if cut or generation is Generation.NOTHING else _parse(body)
    if document is None:
        return RequestSummary(
            body_bytes=body_bytes, cut=cut, generation=generation, key_headers=key_headers
        )
    model = document.get("model")
    options = document.get("stream_options")
    return RequestSummary(
        body_bytes=body_bytes,
        cut=cut,
        generation=generation,
        max_tokens=_first_positive(document, _MAX_TOKEN_FIELDS),
        choices=max(_positive(document.get("n")) or 1, _positive(document.get("best_of")) or 1),
        model=model[:_MAX_MODEL_CHARS] if isinstance(model, str) and model else None,
        stream=document.get("stream") is True,
        include_usage=isinstance(options, dict) and options.get("include_usage") is True,
        key_headers=key_headers,
    )


def headers_holding_keys(headers: Mapping[str, str]) -> tuple[str, ...]:
    """Names of the headers, other than `authorization` (and pseudo-headers, which a key in the
    URL already answers with 400), whose value holds a checksum-valid key, encoded or not."""
    # Indexing by name: a protobuf map's items() goes through collections.abc, twice as slow.
    return tuple(
        name
        for name in headers
        if ("oais" in (value := headers[name]) or "%" in value)  # cheap filter first
        and name != "authorization"
        and not name.startswith(":")
        and holds_live_key(value)
    )


def _generation(method: str, path: str, body_bytes: int, content_length: int | None) -> Generation:
    if method.upper() in _BODILESS_METHODS:
        return Generation.NOTHING
    route = path.partition("?")[0].rstrip("/")
    if route.endswith(_COMPLETION_ENDPOINTS):
        return Generation.COMPLETION
    if route.endswith(_PROMPT_ONLY_ENDPOINTS):
        return Generation.PROMPT_ONLY
    # A POST with neither a forwarded body nor a content-length may be chunked: its size is
    # unknown, not zero, so it keeps the completion reservation.
    if body_bytes == 0 and content_length == 0:
        return Generation.NOTHING
    return Generation.COMPLETION


def _parse(body: bytes) -> dict[str, object] | None:
    """The body as a JSON object, or None for anything else (never raises)."""
    if not body or len(body) > MAX_PARSED_BODY_BYTES:
        return None
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        # ValueError covers invalid JSON, invalid UTF-8 and integers too long to convert;
        # RecursionError covers pathologically nested arrays or objects.
        return None
    return document if isinstance(document, dict) else None


def _positive(value: object) -> int | None:
    # bool is an int subclass: `"max_tokens": true` is garbage, not 1.
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def _first_positive(document: dict[str, object], names: tuple[str, ...]) -> int | None:
    for name in names:
        found = _positive(document.get(name))
        if found is not None:
            return found
    return None
