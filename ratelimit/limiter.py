"""The rate-limiter interface shared by the in-process and Redis backends."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Protocol


class LimitKind(str, Enum):  # noqa: UP042 -- the fixed interface keeps its str mixin
    """Which bucket denied a request; the value is OpenAI's `error.type`."""

    REQUESTS = "requests"
    TOKENS = "tokens"


class QuotaKind(StrEnum):
    """Which monthly allowance denied a request."""

    TOKENS = "tokens"
    SPEND = "spend"


@dataclass(frozen=True, slots=True)
class Limits:
    """A workspace's bucket capacities. Zero means that bucket is unlimited."""

    rpm: int
    tpm: int


@dataclass(frozen=True, slots=True)
class Quota:
    """A workspace's monthly allowance for one period; None = no limit on that axis.

    Unlike `Limits`, zero is not "unlimited" here: a quota of 0 admits nothing.
    """

    period: str
    """"YYYY-MM" (UTC), chosen by the caller; part of the Redis keys."""
    token_quota: int | None
    spend_cap_micros: int | None
    """Micro-USD."""


@dataclass(frozen=True, slots=True)
class QuotaState:
    """A workspace's usage counters for one period, as the limiter saw them."""

    period: str
    tokens_used: int
    spend_used_micros: int
    known: bool
    """False when no counter existed for this workspace+period (Redis lost it, a fresh process):
    the caller may restore the totals from its ledger with `seed_usage`."""
    missing: frozenset[QuotaKind] = field(default=frozenset(), compare=False)
    """Which counters did not exist (for `record_usage`: before it); empty exactly when `known`.
    A restore fills only these: a surviving counter already holds its month. Left out of
    equality, so a state reads as period, usage and `known`."""


@dataclass(frozen=True, slots=True)
class BucketState:
    """One bucket after a decision, as the client is told about it."""

    limit: int
    remaining: int
    reset_seconds: float
    """Seconds until the bucket is full again."""


@dataclass(frozen=True, slots=True)
class LimitResult:
    """The outcome of one atomic check-and-debit over both buckets (and the quota, if given)."""

    allowed: bool
    requests: BucketState
    tokens: BucketState
    denied_by: LimitKind | None = None
    retry_after_seconds: float = 0.0
    """When denied: seconds until the request would fit (0 when allowed)."""
    too_large: bool = False
    """Denied because the token cost exceeds the TPM capacity: waiting never helps."""
    quota_exceeded: QuotaKind | None = None
    """Denied by the period's token quota or spend cap (then `denied_by` is None)."""
    quota: QuotaState | None = None
    """The period's counters at decision time, whenever a quota was passed."""


class RateLimitUnavailable(Exception):
    """The rate-limit backend could not answer in time (or its circuit is open)."""


class RateLimiter(Protocol):
    """Admits a request only if every bucket it touches has room, debiting all or none."""

    async def acquire(
        self,
        workspace_id: str,
        limits: Limits,
        tokens: int,
        *,
        quota: Quota | None = None,
        spend_micros: int = 0,
    ) -> LimitResult:
        """Take one request and `tokens` tokens from the workspace's buckets, atomically.

        With a `quota`, first deny (`quota_exceeded` set, nothing debited) when the period's
        token or spend allowance is used up, or the counters plus `tokens` / `spend_micros`
        would pass it.
        The counters are read, never incremented, here.
        """
        ...

    async def adjust_tokens(self, workspace_id: str, limits: Limits, delta: int) -> None:
        """Charge (delta > 0) or refund (delta < 0) tokens after the real usage is known.

        A charge past what the bucket holds is carried whole as debt: later requests wait until
        refill has paid it (`ratelimit.bucket` has the rule and its only, exactness, bounds).
        """
        ...

    async def record_usage(
        self,
        workspace_id: str,
        limits: Limits,
        *,
        period: str,
        tpm_delta: int,
        tokens: int,
        spend_micros: int,
        operation_id: str | None = None,
    ) -> QuotaState:
        """In one atomic step, adjust the TPM bucket like `adjust_tokens(tpm_delta)` and add
        `tokens` / `spend_micros` to the period's counters (restarting their ~40-day TTL).

        Returns the counters after the increment; its `known` says whether both counters
        existed *before* it, and `missing` which did not (those now hold this report only, and
        `seed_usage` can no longer restore the ledger's earlier total into them; the caller
        adds it to those alone, never to a counter that survived).
        With an `operation_id`, the step applies once per id (remembered for a minute): a
        caller that retries a failed call with the same id cannot count it twice. Without
        one, each call is a new report.
        """
        ...

    async def seed_usage(
        self, workspace_id: str, *, period: str, tokens: int, spend_micros: int
    ) -> None:
        """Set each of the period's counters only if it is absent (SET NX), so a replica that saw
        known=False restores the ledger's totals without clobbering counts others made since."""
        ...

    async def ping(self) -> bool:
        """True when the backend can answer now; used by readiness."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...
