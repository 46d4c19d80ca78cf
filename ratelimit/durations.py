"""Formatting rate-limit times the way OpenAI's headers show them.

`x-ratelimit-reset-*` carry Go `time.Duration.String()` values (`400µs`, `120ms`, `1s`,
`6m0s`), and `retry-after` carries whole seconds.
"""

from __future__ import annotations

import math

_NANOS_PER_SECOND = 1_000_000_000
_NANOS_PER_MICRO = 1_000


def go_duration(nanos: int) -> str:
    """Go's `time.Duration(nanos).String()`, digit for digit: `0s`, `1ns`, `400µs`, `1.5ms`,
    `12s`, `6m0s`, `5h6m7.001s`."""
    magnitude = abs(nanos)
    if magnitude < _NANOS_PER_SECOND:
        if magnitude == 0:
            return "0s"
        if magnitude < 1_000:
            unit, precision = "ns", 0
        elif magnitude < 1_000_000:
            unit, precision = "µs", 3
        else:
            unit, precision = "ms", 6
        whole, fraction = _split_fraction(magnitude, precision)
        text = f"{whole}{fraction}{unit}"
    else:
        seconds, fraction = _split_fraction(magnitude, 9)
        text = f"{seconds % 60}{fraction}s"
        minutes = seconds // 60
        if minutes:
            text = f"{minutes % 60}m{text}"
            hours = minutes // 60
            if hours:
                text = f"{hours}h{text}"
    return "-" + text if nanos < 0 else text


def _split_fraction(value: int, precision: int) -> tuple[int, str]:
    """`value / 10**precision` as its whole part and `.digits` without trailing zeros."""
    if precision == 0:
        return value, ""
    whole, rest = divmod(value, 10**precision)
    digits = f"{rest:0{precision}d}".rstrip("0")
    return whole, "." + digits if digits else ""


def format_go_duration(seconds: float) -> str:
    """`go_duration` of `seconds` rounded to whole microseconds (finer digits would be float
    noise: the buckets count in milliseconds).

    Negative or non-finite inputs are clamped to `0s` (a reset is never in the past; a header
    must always parse).
    """
    if not math.isfinite(seconds) or seconds <= 0:
        return "0s"
    return go_duration(round(seconds * 1_000_000) * _NANOS_PER_MICRO)


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
