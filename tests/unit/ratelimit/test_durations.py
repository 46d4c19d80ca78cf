"""Go-style durations for x-ratelimit-reset-*, and retry-after seconds."""

from __future__ import annotations

import pytest

from ratelimit.durations import format_go_duration, retry_after_header


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (0, "0s"),
        (0.0004, "400µs"),
        (0.0005, "500µs"),
        (0.001, "1ms"),
        (0.12, "120ms"),
        (0.999, "999ms"),
        (0.9996, "999.6ms"),
        (1, "1s"),
        (1.5, "1.5s"),
        (1.05, "1.05s"),
        (2.001, "2.001s"),
        (12, "12s"),
        (59.999, "59.999s"),
        (60, "1m0s"),
        (90.5, "1m30.5s"),
        (360, "6m0s"),
        (3599.999, "59m59.999s"),
        (3600, "1h0m0s"),
        (3600.5, "1h0m0.5s"),
        (90061.25, "25h1m1.25s"),
        (-3, "0s"),
        (float("nan"), "0s"),
        (float("inf"), "0s"),
    ],
)
def test_format_go_duration(seconds: float, expected: str) -> None:
    assert format_go_duration(seconds) == expected


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (12.0, "12"),
        (11.001, "12"),
        (0.001, "1"),
        (0, "1"),
        (-1, "1"),
        (3.0000000000000004, "3"),
        (60.0, "60"),
        (float("nan"), "1"),
    ],
)
def test_retry_after_header(seconds: float, expected: str) -> None:
    assert retry_after_header(seconds) == expected
