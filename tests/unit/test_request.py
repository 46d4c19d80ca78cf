"""The one body parse (authz/request.py) and the token estimate it feeds:
ceil(body_bytes / 4) + max_tokens (times n / best_of)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authz.decision import reserve
from authz.models import ModelPrice
from authz.request import MAX_PARSED_BODY_BYTES, RequestSummary, summarize
from authz.usage.pricing import PriceTable
from tests.support.checks import check_request
from tests.support.fakes import workspace

DEFAULT = 256
MAX_REQUEST_BYTES = 65536


def estimate_tokens(
    *,
    body: bytes | None,
    content_length: str | None,
    default_completion_tokens: int,
    partial: bool = False,
    method: str = "POST",
    path: str = "/v1/chat/completions",
    raw: bool = True,
) -> int:
    """The reservation of a request Envoy sent with this body (in `raw_body`, or `body` when
    `raw` is False) and these headers."""
    headers = {}
    if content_length is not None:
        headers["content-length"] = content_length
    if partial:
        headers["x-envoy-auth-partial-body"] = "true"
    request = check_request(path=path, method=method, headers=headers, body=body or b"")
    if not raw:
        http = request.attributes.request.http
        http.body = http.raw_body.decode()
        http.raw_body = b""
    summary = summarize(request.attributes.request.http, max_request_bytes=MAX_REQUEST_BYTES)
    ws = workspace(default_completion=default_completion_tokens)
    return reserve(summary, ws, PriceTable(), now_ts=0).tokens


def estimate(body: bytes | None = None, content_length: str | None = None) -> int:
    return estimate_tokens(
        body=body, content_length=content_length, default_completion_tokens=DEFAULT
    )


def test_body_size_rounds_up_and_adds_max_tokens() -> None:
    body = json.dumps({"model": "m", "max_tokens": 100}).encode()
    assert estimate(body) == -(-len(body) // 4) + 100


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    body = b'{"max_tokens": 100, "max_completion_tokens": 7}'
    assert estimate(body) == -(-len(body) // 4) + 7


def test_invalid_max_completion_tokens_falls_back_to_max_tokens() -> None:
    body = b'{"max_completion_tokens": -1, "max_tokens": 9}'
    assert estimate(body) == -(-len(body) // 4) + 9


@pytest.mark.parametrize(
    "value", ["true", "false", "0", "-5", "1.5", '"100"', "null", "[1]", "1e400", "9" * 5000]
)
def test_garbage_max_tokens_uses_the_default(value: str) -> None:
    body = b'{"max_tokens": ' + value.encode() + b"}"
    assert estimate(body) == -(-len(body) // 4) + DEFAULT


def test_body_without_max_uses_the_default() -> None:
    assert estimate(b'{"model": "m"}') == 4 + DEFAULT


def test_empty_body() -> None:
    assert estimate(b"") == DEFAULT


def test_non_object_json_uses_the_default() -> None:
    assert estimate(b'[{"max_tokens": 5}]') == 5 + DEFAULT


def test_nested_max_tokens_is_ignored() -> None:
    body = b'{"tools": {"max_tokens": 5}}'
    assert estimate(body) == -(-len(body) // 4) + DEFAULT


def test_deeply_nested_json_does_not_raise() -> None:
    body = b'{"max_tokens": 5, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert estimate(body) == -(-len(body) // 4) + DEFAULT


def test_invalid_utf8_does_not_raise() -> None:
    body = b'{"max_tokens": 5, "x": "\xff\xfe"}'
    assert estimate(body) == -(-len(body) // 4) + DEFAULT


def test_oversized_body_is_not_parsed() -> None:
    body = b'{"max_tokens": 5, "pad": "' + b"a" * MAX_PARSED_BODY_BYTES + b'"}'
    assert estimate(body) == -(-len(body) // 4) + DEFAULT


@pytest.mark.parametrize(
    ("header", "body_bytes"),
    [
        ("400", 400),
        (" 401 ", 401),
        ("0", 0),
        (None, 0),
        ("", 0),
        ("-5", 0),
        ("12abc", 0),
        ("1e3", 0),
        ("٣", 0),  # a non-ASCII digit
        ("9" * 19, 0),
        ("9" * 5000, 0),
    ],
)
def test_content_length_when_the_body_was_not_forwarded(
    header: str | None, body_bytes: int
) -> None:
    assert estimate(None, header) == -(-body_bytes // 4) + DEFAULT


def test_forwarded_body_wins_over_content_length() -> None:
    assert estimate(b"abcd", "4000") == 1 + DEFAULT


def test_negative_default_counts_as_zero() -> None:
    assert estimate_tokens(body=None, content_length=None, default_completion_tokens=-3) == 0


@settings(max_examples=300, deadline=None)
@given(body=st.one_of(st.binary(max_size=512), st.binary(max_size=64).map(lambda b: b"max_" + b)))
def test_never_raises_on_arbitrary_bytes(body: bytes) -> None:
    assert estimate(body) >= -(-len(body) // 4)


@settings(max_examples=200, deadline=None)
@given(
    document=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(st.sampled_from(["max_tokens", "max_completion_tokens", "x"]), inner)
        ),
        max_leaves=10,
    )
)
def test_never_raises_on_arbitrary_json(document: object) -> None:
    body = json.dumps(document).encode()
    assert estimate(body) >= -(-len(body) // 4)


@settings(max_examples=100, deadline=None)
@given(header=st.text(max_size=30))
def test_never_raises_on_arbitrary_content_length(header: str) -> None:
    assert estimate(None, header) >= DEFAULT


def test_a_body_cut_by_envoy_is_sized_from_content_length() -> None:
    head = b'{"max_tokens": 10, "messages": [' + b"x" * 100
    # Envoy forwarded only the head of a 4000-byte body: reserve for the whole of it.
    assert (
        estimate_tokens(body=head, content_length="4000", default_completion_tokens=7, partial=True)
        == 1000 + 7
    )
    # A complete body is what it is, whatever content-length claims.
    assert (
        estimate_tokens(body=head, content_length="4000", default_completion_tokens=7)
        == -(-len(head) // 4) + 7
    )


# The one parse: what it reads, from either body field.


def _summary(
    body: bytes, *, raw: bool = True, headers: dict[str, str] | None = None
) -> RequestSummary:
    request = check_request(headers=headers, body=body)
    http = request.attributes.request.http
    if not raw:
        http.body = body.decode()
        http.raw_body = b""
    return summarize(http, max_request_bytes=MAX_REQUEST_BYTES)


@pytest.mark.parametrize("raw", [True, False])
def test_both_body_fields_are_read_alike(raw: bool) -> None:
    body = (
        b'{"model": "m", "max_tokens": 5000, "stream": true,'
        b' "stream_options": {"include_usage": true}}'
    )
    summary = _summary(body, raw=raw)
    assert (summary.body_bytes, summary.max_tokens, summary.model) == (len(body), 5000, "m")
    assert (summary.stream, summary.include_usage) == (True, True)
    assert (
        estimate_tokens(body=body, content_length=None, default_completion_tokens=DEFAULT, raw=raw)
        == -(-len(body) // 4) + 5000
    )


def test_stream_without_include_usage() -> None:
    summary = _summary(b'{"stream": true, "stream_options": {"include_usage": "yes"}}')
    assert (summary.stream, summary.include_usage) == (True, False)
    assert _summary(b'{"stream": 1}').stream is False


@pytest.mark.parametrize(
    "body",
    [
        b'{"metadata": {"model": "x"}, "model": "gpt-big"}',
        b'{"model": "gpt\\u002dbig"}',
        b'{"messages": [{"model": "x"}], "model": "gpt-big"}',
    ],
)
def test_the_model_is_the_top_level_field_only(body: bytes) -> None:
    assert _summary(body).model == "gpt-big"
    # The spend-cap reservation prices it as gpt-big, not as the unpriced nested "x".
    ws = replace(workspace(default_completion=0), monthly_spend_cap_usd=10.0)
    prices = PriceTable([ModelPrice("gpt-big", 1.0, 1000.0)])
    reservation = reserve(_summary(body), ws, prices, now_ts=0)
    assert reservation.spend_micros == reservation.tokens * 1000


def test_a_nested_model_alone_is_no_model() -> None:
    assert _summary(b'{"metadata": {"model": "x"}}').model is None
    assert _summary(b'{"model": 7}').model is None


@pytest.mark.parametrize(
    ("fields", "choices"),
    [
        ("", 1),
        (', "n": 3', 3),
        (', "best_of": 5, "n": 2', 5),
        (', "n": 4, "best_of": 2', 4),
        (', "n": 0', 1),
        (', "n": true', 1),
        (', "n": -2', 1),
        (', "n": "3"', 1),
    ],
)
def test_n_and_best_of_multiply_the_completion(fields: str, choices: int) -> None:
    body = b'{"max_tokens": 100' + fields.encode() + b"}"
    assert _summary(body).choices == choices
    assert estimate(body) == -(-len(body) // 4) + 100 * choices


@pytest.mark.parametrize(
    ("method", "path", "body", "content_length", "completion"),
    [
        ("GET", "/v1/models", b"", None, 0),
        ("GET", "/v1/models/gpt-4o", b"", None, 0),
        ("DELETE", "/v1/files/file_1", b"", None, 0),
        ("GET", "/v1/chat/completions?limit=5", b"", None, 0),
        ("POST", "/v1/files", b"", "0", 0),
        ("POST", "/v1/embeddings", b'{"input": "hi"}', None, 0),
        ("POST", "/v1/moderations", b'{"input": "hi"}', None, 0),
        ("POST", "/v1/chat/completions", b'{"messages": []}', None, DEFAULT),
        ("POST", "/v1/completions", b'{"prompt": "x"}', None, DEFAULT),
        ("POST", "/v1/responses", b'{"input": "x"}', None, DEFAULT),
        ("POST", "/v1/audio/speech", b'{"input": "x"}', None, DEFAULT),
        ("POST", "/v1/chat/completions", b"", None, DEFAULT),  # chunked, body not forwarded
    ],
)
def test_completion_reservation_per_endpoint(
    method: str, path: str, body: bytes, content_length: str | None, completion: int
) -> None:
    """The table in docs/contract.md §3."""
    tokens = estimate_tokens(
        body=body,
        content_length=content_length,
        default_completion_tokens=DEFAULT,
        method=method,
        path=path,
    )
    assert tokens == -(-len(body) // 4) + completion


# A body Envoy cut at max_request_bytes (65,536 in the shipped configs): sized from
# content-length whatever the partial flag says; chunked, from the buffered size plus the
# workspace's default completion.

FIVE_MB = 5 * 1024 * 1024


@pytest.mark.parametrize("raw", [True, False])
@pytest.mark.parametrize(("buffered", "cut"), [(65_535, False), (65_536, True), (65_537, True)])
def test_sizes_at_the_envoy_limit(buffered: int, cut: bool, raw: bool) -> None:
    head = b'{"max_tokens": 10, "x": "' + b"a" * (buffered - 27) + b'"}'
    assert len(head) == buffered
    for partial in (False, True):
        tokens = estimate_tokens(
            body=head,
            content_length=str(FIVE_MB),
            default_completion_tokens=DEFAULT,
            partial=partial,
            raw=raw,
        )
        if cut or partial:
            assert tokens == FIVE_MB // 4 + DEFAULT
        else:
            # A complete body is what it is, whatever content-length claims.
            assert tokens == -(-buffered // 4) + 10
        chunked = estimate_tokens(
            body=head,
            content_length=None,
            default_completion_tokens=DEFAULT,
            raw=raw,
            partial=partial,
        )
        if cut or partial:
            assert chunked == -(-buffered // 4) + DEFAULT
        else:
            assert chunked == -(-buffered // 4) + 10
