"""x-ratelimit-reset-* as Go's time.Duration.String() prints them, at every scale."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ratelimit.durations import format_go_duration, go_duration

NS, US, MS, S = 1, 1_000, 1_000_000, 1_000_000_000
MINUTE, HOUR = 60 * S, 3600 * S


@pytest.mark.parametrize(
    ("nanos", "go"),
    [
        # Go's own table (src/time/time_test.go, durationTests).
        (0, "0s"),
        (1 * NS, "1ns"),
        (1100 * NS, "1.1µs"),
        (2200 * US, "2.2ms"),
        (3300 * MS, "3.3s"),
        (4 * MINUTE + 5 * S, "4m5s"),
        (4 * MINUTE + 5001 * MS, "4m5.001s"),
        (5 * HOUR + 6 * MINUTE + 7001 * MS, "5h6m7.001s"),
        (8 * MINUTE + 1 * NS, "8m0.000000001s"),
        ((1 << 63) - 1, "2562047h47m16.854775807s"),
        (-(1 << 63), "-2562047h47m16.854775808s"),
        # The scales OpenAI's headers show.
        (400 * US, "400µs"),
        (1500 * US, "1.5ms"),
        (12 * S, "12s"),
        (6 * MINUTE, "6m0s"),
        (999 * NS, "999ns"),
        (1 * US, "1µs"),
        (1 * MS, "1ms"),
        (HOUR, "1h0m0s"),
    ],
)
def test_matches_go(nanos: int, go: str) -> None:
    assert go_duration(nanos) == go


@pytest.mark.parametrize(
    ("seconds", "header"),
    [(0.0004, "400µs"), (0.0015, "1.5ms"), (12, "12s"), (360, "6m0s"), (0.000_000_4, "0s")],
)
def test_reset_headers_at_every_scale(seconds: float, header: str) -> None:
    assert format_go_duration(seconds) == header


_UNITS = {"ns": NS, "µs": US, "ms": MS, "s": S, "m": MINUTE, "h": HOUR}
_PART = re.compile(r"(\d+)(?:\.(\d+))?(ns|µs|ms|s|m|h)")


def parse_go_duration(text: str) -> int:
    """Go's time.ParseDuration for the forms String() prints (an independent inverse)."""
    sign = -1 if text.startswith("-") else 1
    text = text.removeprefix("-")
    total, position = 0, 0
    for part in _PART.finditer(text):
        assert part.start() == position, text
        whole, fraction, unit = part.groups()
        scale = _UNITS[unit]
        total += int(whole) * scale
        if fraction:
            total += int(fraction) * scale // 10 ** len(fraction)
        position = part.end()
    assert position == len(text), text
    return sign * total


_CANONICAL = re.compile(
    r"-?(0s|\d+(\.\d*[1-9])?(ns|µs|ms)|((\d+h)?[0-5]?\d?m)?[0-5]?\d(\.\d*[1-9])?s)"
)


@given(st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1))
def test_round_trips_and_is_canonical(nanos: int) -> None:
    text = go_duration(nanos)
    assert parse_go_duration(text) == nanos
    assert _CANONICAL.fullmatch(text), text
    # Sub-second values use one unit; a minute or more always shows its seconds.
    if abs(nanos) >= MINUTE:
        assert text.endswith("s")
        assert "m" in text
