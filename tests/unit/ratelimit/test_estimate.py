"""The request's token estimate: ceil(body_bytes / 4) + max_tokens."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ratelimit.estimate import MAX_PARSED_BODY_BYTES, estimate_tokens

DEFAULT = 256


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
