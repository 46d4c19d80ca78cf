"""The token estimate a request reserves from its workspace's TPM bucket (CONTRACT §3).

`ceil(body_bytes / 4) + max_tokens`: the prompt is guessed from the body size, the completion
from the request's own `max_completion_tokens` / `max_tokens`, else the workspace's default.
The real usage is charged or refunded later with `RateLimiter.adjust_tokens`.
"""

from __future__ import annotations

import json

MAX_PARSED_BODY_BYTES = 1 << 20
"""Bodies larger than this are not JSON-parsed (the default completion reservation applies):
parsing is on the request path and a multi-megabyte prompt would cost milliseconds."""

_MAX_CONTENT_LENGTH_DIGITS = 18
"""Longer `content-length` values are garbage (and would make `int()` slow or raise)."""

_BYTES_PER_TOKEN = 4
_MAX_TOKEN_FIELDS = ("max_completion_tokens", "max_tokens")


def estimate_tokens(
    *,
    body: bytes | None,
    content_length: str | None,
    default_completion_tokens: int,
    partial: bool = False,
) -> int:
    """Tokens to reserve for one request; never raises, whatever the client sent.

    `body` is the request body when Envoy forwarded it (it wins over `content_length`). When
    Envoy cut it at `max_request_bytes` (`partial`), the size comes from `content_length` if
    that is larger, so a big prompt cannot pass for a small one.
    """
    if body is not None:
        body_bytes = len(body)
        if partial:
            body_bytes = max(body_bytes, _parse_content_length(content_length))
        completion = _max_tokens_from_body(body)
    else:
        body_bytes = _parse_content_length(content_length)
        completion = None
    if completion is None:
        completion = max(default_completion_tokens, 0)
    return -(-body_bytes // _BYTES_PER_TOKEN) + completion


def _parse_content_length(value: str | None) -> int:
    """A valid `content-length` (plain ASCII decimal digits), else 0."""
    if value is None:
        return 0
    value = value.strip()
    if not value or len(value) > _MAX_CONTENT_LENGTH_DIGITS:
        return 0
    if not (value.isascii() and value.isdigit()):
        return 0
    return int(value)


def _max_tokens_from_body(body: bytes) -> int | None:
    """The JSON object's `max_completion_tokens` or `max_tokens` if a positive int, else None."""
    # A cheap substring test skips the JSON parse for the many bodies without the field.
    if b"max_" not in body or len(body) > MAX_PARSED_BODY_BYTES:
        return None
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        # ValueError covers invalid JSON, invalid UTF-8 and integers too long to convert;
        # RecursionError covers pathologically nested arrays or objects.
        return None
    if not isinstance(document, dict):
        return None
    for field in _MAX_TOKEN_FIELDS:
        value = document.get(field)
        # bool is an int subclass: `"max_tokens": true` is garbage, not 1.
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None
