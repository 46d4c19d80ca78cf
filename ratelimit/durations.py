"""Formatting rate-limit times the way OpenAI's headers show them.

`x-ratelimit-reset-*` carry Go `time.Duration.String()` values (`120ms`, `1s`, `6m0s`), and
`retry-after` carries whole seconds.
"""

from __future__ import annotations

import math

_MS_PER_SECOND = 1_000
_MS_PER_MINUTE = 60 * _MS_PER_SECOND
_MS_PER_HOUR = 60 * _MS_PER_MINUTE


def _round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


def format_go_duration(seconds: float) -> str:
    """Go's `time.Duration.String()` of `seconds` rounded to whole milliseconds.

    Examples: `0s`, `120ms`, `1s`, `1.5s`, `59.999s`, `6m0s`, `1h0m0s`. Negative or non-finite
    inputs are clamped to `0s` (a reset is never in the past; a header must always parse).
    """
    if not math.isfinite(seconds) or seconds <= 0:
        return "0s"
    total_ms = _round_half_up(seconds * _MS_PER_SECOND)
    if total_ms == 0:
        return "0s"
    if total_ms < _MS_PER_SECOND:
        return f"{total_ms}ms"
    hours, rest = divmod(total_ms, _MS_PER_HOUR)
    minutes, rest = divmod(rest, _MS_PER_MINUTE)
    whole_seconds, millis = divmod(rest, _MS_PER_SECOND)
    secs = str(whole_seconds)
    if millis:
        secs += "." + f"{millis:03d}".rstrip("0")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def retry_after_header(seconds: float) -> str:
    """The `retry-after` value: whole seconds rounded up, at least 1.

    At least 1 because the header is only sent on a denial, and `0` would invite an immediate
    retry that is denied again. Rounding goes through whole microseconds first, so float noise
    such as 3.0000000000000004 does not add a second.
    """
    if not math.isfinite(seconds) or seconds <= 0:
        return "1"
    micros = round(seconds * 1_000_000)
    return str(max(1, -(-micros // 1_000_000)))
