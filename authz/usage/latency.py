"""The latency summary: a fixed-bucket histogram of request durations. Pure: no I/O.

The buckets are the same everywhere (every hour, key and replica), so summaries of any rows
add bucket by bucket, and percentiles can be read for any range after the fact. Bucket `i`
holds durations in (2^((i-1)/4), 2^(i/4)] milliseconds (bucket 0 holds up to 1 ms), so each
bucket is about 19 % wide; `OVERFLOW` holds everything above 2^17 ms (about 131 s).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

STEPS_PER_DOUBLING = 4
OVERFLOW = 17 * STEPS_PER_DOUBLING + 1
"""The last bucket: anything slower than the largest finite bound."""


def upper_ms(bucket: int) -> float:
    """The inclusive upper bound of a finite bucket, in milliseconds."""
    return float(2.0 ** (bucket / STEPS_PER_DOUBLING))


def bucket_of(seconds: float) -> int:
    """The bucket a duration falls in (negative or NaN durations count as 0)."""
    ms = seconds * 1000.0
    if not ms > 1.0:  # also catches NaN
        return 0
    if math.isinf(ms):
        return OVERFLOW
    index = math.ceil(STEPS_PER_DOUBLING * math.log2(ms))
    # log2 rounding can land one bucket off at an exact bound: settle it on the bounds.
    if index > 0 and ms <= upper_ms(index - 1):
        index -= 1
    elif ms > upper_ms(index):
        index += 1
    return min(index, OVERFLOW)


def merge(histograms: Iterable[Mapping[int, int]]) -> dict[int, int]:
    """Bucket-by-bucket sum: the summary of everything the inputs summarize."""
    total: dict[int, int] = {}
    for histogram in histograms:
        for bucket, count in histogram.items():
            if count:
                total[bucket] = total.get(bucket, 0) + count
    return total


def percentile(histogram: Mapping[int, int], q: float) -> float | None:
    """The q-quantile (0 < q <= 1) in milliseconds, None when there is nothing.

    Linear within the bucket that holds it, like Prometheus' histogram_quantile, so the answer
    is within the bucket's bounds; the overflow bucket answers with its lower bound.
    """
    if not 0.0 < q <= 1.0:
        raise ValueError(f"quantile {q} is not in (0, 1]")
    total = sum(count for count in histogram.values() if count > 0)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for bucket in sorted(b for b, count in histogram.items() if count > 0):
        count = histogram[bucket]
        if seen + count >= rank:
            if bucket >= OVERFLOW:
                return upper_ms(OVERFLOW - 1)
            lower = 0.0 if bucket == 0 else upper_ms(bucket - 1)
            return lower + (upper_ms(bucket) - lower) * (rank - seen) / count
        seen += count
    raise AssertionError("unreachable: the ranks add up to the total")
