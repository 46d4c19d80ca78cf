"""The rate-limiter interface shared by the in-process and Redis backends."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Protocol


class LimitKind(str, Enum):  # noqa: UP042 -- the fixed interface keeps its str mixin
    """Which bucket denied a request; the value is OpenAI's `error.type`."""

    REQUESTS = "requests"
    TOKENS = "tokens"


@dataclass(frozen=True, slots=True)
class Limits:
    """A workspace's bucket capacities. Zero means that bucket is unlimited."""

    rpm: int
    tpm: int


@dataclass(frozen=True, slots=True)
class BucketState:
    """One bucket after a decision, as the client is told about it."""

    limit: int
    remaining: int
    reset_seconds: float
    """Seconds until the bucket is full again."""


@dataclass(frozen=True, slots=True)
class LimitResult:
    """The outcome of one atomic check-and-debit over both buckets."""

    allowed: bool
    requests: BucketState
    tokens: BucketState
    denied_by: LimitKind | None = None
    retry_after_seconds: float = 0.0
    """When denied: seconds until the request would fit (0 when allowed)."""
    too_large: bool = False
    """Denied because the token cost exceeds the TPM capacity: waiting never helps."""


class RateLimitUnavailable(Exception):
    """The rate-limit backend could not answer in time (or its circuit is open)."""


class RateLimiter(Protocol):
    """Admits a request only if every bucket it touches has room, debiting all or none."""

    async def acquire(self, workspace_id: str, limits: Limits, tokens: int) -> LimitResult:
        """Take one request and `tokens` tokens from the workspace's buckets, atomically."""
        ...

    async def adjust_tokens(self, workspace_id: str, limits: Limits, delta: int) -> None:
        """Charge (delta > 0) or refund (delta < 0) tokens after the real usage is known."""
        ...

    async def ping(self) -> bool:
        """True when the backend can answer now; used by readiness."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...
