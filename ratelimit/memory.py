"""The in-process rate limiter: the embedded default when no Redis is configured.

Buckets live in this process only, so it is correct for exactly one sidecar process. It runs the
same maths as the Redis script (`ratelimit.bucket`), and, like the Redis keys' TTLs, forgets
buckets that are full again, so memory stays bounded by the workspaces active in the last
couple of minutes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from ratelimit import bucket
from ratelimit.limiter import LimitResult, Limits

SWEEP_INTERVAL_MS = 1_000
"""How often (at most) forgotten buckets are swept; a sweep is O(buckets held)."""


def monotonic_ms() -> int:
    """The default clock: whole milliseconds of `time.monotonic_ns`."""
    return time.monotonic_ns() // 1_000_000


@dataclass(slots=True)
class _Held:
    state: bucket.BucketLevel
    full_at_ms: int
    """From this moment the bucket is full, which is exactly what a forgotten bucket is."""


class InMemoryRateLimiter:
    """`RateLimiter` over per-process buckets; `clock_ms` returns monotonic milliseconds.

    Every method runs without awaiting, so each call is atomic on the event loop.
    """

    def __init__(self, *, clock_ms: Callable[[], int] = monotonic_ms) -> None:
        self._clock_ms = clock_ms
        self._buckets: dict[tuple[str, str], _Held] = {}
        self._last_sweep_ms: int | None = None

    async def acquire(self, workspace_id: str, limits: Limits, tokens: int) -> LimitResult:
        """Take one request and `tokens` tokens, from both buckets or neither."""
        limits = bucket.normalise_limits(limits)
        cost = bucket.normalise_cost(tokens)
        now = self._now()
        req_key, tok_key = (workspace_id, "req"), (workspace_id, "tok")
        outcome = bucket.acquire(
            limits,
            cost,
            now_ms=now,
            requests=self._get(req_key),
            tokens=self._get(tok_key),
        )
        if outcome.requests is not None:
            self._put(req_key, limits.rpm, outcome.requests)
        if outcome.tokens is not None:
            self._put(tok_key, limits.tpm, outcome.tokens)
        return outcome.decision.to_result()

    async def adjust_tokens(self, workspace_id: str, limits: Limits, delta: int) -> None:
        """Charge (delta > 0) or refund (delta < 0) tokens once the real usage is known."""
        tpm = bucket.normalise_limits(limits).tpm
        if not tpm or not delta:
            return
        key = (workspace_id, "tok")
        state = bucket.adjust(
            tpm, bucket.normalise_delta(delta, tpm), now_ms=self._now(), tokens=self._get(key)
        )
        if state is not None:
            self._put(key, tpm, state)

    async def ping(self) -> bool:
        """Always ready: there is no backend to lose."""
        return True

    async def close(self) -> None:
        """Drop all buckets."""
        self._buckets.clear()

    def __len__(self) -> int:
        """How many bucket states are held (for tests of the memory bound)."""
        return len(self._buckets)

    def _now(self) -> int:
        now = self._clock_ms()
        if self._last_sweep_ms is None or now - self._last_sweep_ms >= SWEEP_INTERVAL_MS:
            self._last_sweep_ms = now
            self._sweep(now)
        return now

    def _get(self, key: tuple[str, str]) -> bucket.BucketLevel | None:
        held = self._buckets.get(key)
        return None if held is None else held.state

    def _put(self, key: tuple[str, str], limit: int, state: bucket.BucketLevel) -> None:
        full_in = bucket.ms_to_reach(limit, state.level, bucket.capacity(limit))
        self._buckets[key] = _Held(state=state, full_at_ms=state.updated_ms + full_in)

    def _sweep(self, now: int) -> None:
        expired = [key for key, held in self._buckets.items() if held.full_at_ms <= now]
        for key in expired:
            del self._buckets[key]
