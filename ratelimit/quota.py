"""Monthly token quota and spend cap: the pure maths, mirrored by `the Lua scripts`.

A workspace has two usage counters per period ("YYYY-MM", UTC, chosen by the caller): tokens
used and spend used in micro-USD. Check time only *reads* them; reconciliation (`record`) adds
the real usage; `seed` restores them from the ledger when they are missing. The sidecar records
and seeds through `ratelimit.marks`, which keeps them exact against the ledger through losses
that race other replicas' flushes; `record` and `seed` here are the plain operations
(`record_usage` without a tag, `seed_usage`).

Rules
-----
* A request is denied by the quota (TOKENS) when the month's tokens are used up
  (`tokens_used >= token_quota`, so even a request that adds nothing waits) or it would not fit
  (`tokens_used + tokens > token_quota`); else by the same rule for spend (SPEND). A request
  that lands exactly on the quota is allowed. None means no limit on that axis; zero allows
  nothing.
* The quota is checked before the buckets, and a quota denial debits no bucket. Its bucket
  reports are the buckets as they stand, `denied_by` is None and `retry_after` 0 (waiting for
  the next period is the caller's business).
* A missing counter never admits: when either counter is absent (Redis lost it, a new
  process, a new month) and the quota limits at least one axis, the request is refused with
  `known` False, `quota_exceeded` None and no bucket debited, so the caller restores the
  counters (`seed`) and asks again. Admitting on a zero is how a used-up month used to reopen
  after a Redis loss (issue 18, finding 5). Reported counters read a missing one as 0.
* `record` adds to both counters (creating them) and restarts both TTLs; `seed` sets each missing
  counter, leaving an existing one (and its TTL) alone, like Redis' `SET NX`.
* Counters live `COUNTER_TTL_SECONDS` after their last write, so old periods vanish, while the
  current period's counters (written at least once during it) outlive it.

Integers only: counters saturate at `MAX_COUNTER` (10^15: a quadrillion tokens, or a billion
USD in micro-USD), and amounts are clamped to `MAX_COUNTER + 1`, so every sum the Lua script
forms stays far below 2^53 and is exact in doubles.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, replace

from ratelimit import bucket
from ratelimit.limiter import Limits, Quota, QuotaKind, QuotaState

MAX_COUNTER = 10**15
"""Counters saturate here; quotas above it are clamped to it."""

COUNTER_TTL_SECONDS = 40 * 24 * 3600
"""About 40 days from a counter's last write: longer than any month, short enough to vanish."""

COUNTER_TTL_MS = COUNTER_TTL_SECONDS * bucket.MS_PER_SECOND

NO_LIMIT = -1
"""How an axis without a limit (None) travels to the script."""

_PERIOD = re.compile(r"[0-9]{4}-(0[1-9]|1[0-2])")


def validate_period(period: str) -> str:
    """`period` itself when it is "YYYY-MM", else ValueError (it becomes part of Redis keys)."""
    if not _PERIOD.fullmatch(period):
        raise ValueError(f"quota period must be 'YYYY-MM', got {period!r}")
    return period


def month_period(epoch_seconds: float | None = None) -> str:
    """The UTC calendar month ("YYYY-MM") of a Unix time (default: now)."""
    moment = time.gmtime(time.time() if epoch_seconds is None else epoch_seconds)
    return f"{moment.tm_year:04d}-{moment.tm_mon:02d}"


def normalise_quota(quota: Quota) -> Quota:
    """Validate the period and clamp each limit into [0, MAX_COUNTER]; negative is a bug."""
    validate_period(quota.period)
    return Quota(
        period=quota.period,
        token_quota=_clamp_limit(quota.token_quota, "token quota"),
        spend_cap_micros=_clamp_limit(quota.spend_cap_micros, "spend cap"),
    )


def _clamp_limit(limit: int | None, what: str) -> int | None:
    if limit is None:
        return None
    if limit < 0:
        raise ValueError(f"{what} must be >= 0 or None, got {limit}")
    return min(limit, MAX_COUNTER)


def normalise_amount(amount: int, what: str) -> int:
    """Clamp a usage amount (tokens or micro-USD) into [0, MAX_COUNTER + 1]; negative is a bug."""
    if amount < 0:
        raise ValueError(f"{what} must be >= 0, got {amount}")
    return min(amount, MAX_COUNTER + 1)


def to_wire_limit(limit: int | None) -> int:
    """A normalised quota limit as the script takes it."""
    return NO_LIMIT if limit is None else limit


def state_from_wire(period: str, tokens_used: int, spend_used: int, existed: int) -> QuotaState:
    """The counters as a script reports them (see `missing_from_wire`)."""
    missing = bucket.missing_from_wire(existed)
    return QuotaState(
        period=period,
        tokens_used=tokens_used,
        spend_used_micros=spend_used,
        known=not missing,
        missing=missing,
    )


@dataclass(frozen=True, slots=True)
class Counters:
    """The stored counters of one workspace and period; None = that counter does not exist."""

    tokens: int | None = None
    spend_micros: int | None = None

    @property
    def known(self) -> bool:
        """Both counters exist."""
        return self.tokens is not None and self.spend_micros is not None

    @property
    def missing(self) -> frozenset[QuotaKind]:
        """The counters that do not exist."""
        absent = ((QuotaKind.TOKENS, self.tokens), (QuotaKind.SPEND, self.spend_micros))
        return frozenset(kind for kind, value in absent if value is None)

    def state(self, period: str) -> QuotaState:
        """The public form (a missing counter reads as 0)."""
        return QuotaState(
            period=period,
            tokens_used=self.tokens or 0,
            spend_used_micros=self.spend_micros or 0,
            known=self.known,
            missing=self.missing,
        )


def exceeded(quota: Quota, counters: Counters, tokens: int, spend_micros: int) -> QuotaKind | None:
    """Which allowance this request would pass (tokens first), or None. Inputs normalised."""
    if quota.token_quota is not None and _passes(counters.tokens or 0, tokens, quota.token_quota):
        return QuotaKind.TOKENS
    spent = counters.spend_micros or 0
    if quota.spend_cap_micros is not None and _passes(spent, spend_micros, quota.spend_cap_micros):
        return QuotaKind.SPEND
    return None


def _passes(used: int, wanted: int, allowance: int) -> bool:
    """Used up already (even a request that adds nothing waits), or would not fit."""
    return used >= allowance or used + wanted > allowance


def acquire(
    limits: Limits,
    cost: int,
    *,
    now_ms: int,
    requests: bucket.BucketLevel | None,
    tokens: bucket.BucketLevel | None,
    quota: Quota,
    counters: Counters,
    usage_tokens: int,
    usage_spend: int,
) -> bucket.Acquisition:
    """The quota check, then (if it passes and both counters exist) `bucket.acquire`; the
    counters are not changed.

    `limits`, `cost` and `quota` must be normalised; `usage_tokens` is the request's token count
    and `usage_spend` its spend, both through `normalise_amount` (`cost` is the same token count
    clamped for the buckets).
    """
    state = counters.state(quota.period)
    kind = exceeded(quota, counters, usage_tokens, usage_spend)
    limited = quota.token_quota is not None or quota.spend_cap_micros is not None
    if kind is None and (counters.known or not limited):
        outcome = bucket.acquire(limits, cost, now_ms=now_ms, requests=requests, tokens=tokens)
        return replace(outcome, decision=replace(outcome.decision, quota=state))
    req_report, tok_report = bucket.peek(limits, now_ms=now_ms, requests=requests, tokens=tokens)
    decision = bucket.LimitDecision(
        allowed=False,
        denied_by=None,
        too_large=False,
        retry_after_ms=0,
        requests=req_report,
        tokens=tok_report,
        quota_exceeded=kind,
        quota=state,
    )
    return bucket.Acquisition(decision=decision, requests=None, tokens=None)


def record(counters: Counters, tokens: int, spend_micros: int) -> Counters:
    """Both counters after adding normalised amounts (a missing counter starts at 0)."""
    return Counters(
        tokens=min((counters.tokens or 0) + tokens, MAX_COUNTER),
        spend_micros=min((counters.spend_micros or 0) + spend_micros, MAX_COUNTER),
    )


def seed(counters: Counters, tokens: int, spend_micros: int) -> Counters:
    """Each missing counter set to its normalised amount; existing ones kept."""
    return Counters(
        tokens=counters.tokens if counters.tokens is not None else min(tokens, MAX_COUNTER),
        spend_micros=(
            counters.spend_micros
            if counters.spend_micros is not None
            else min(spend_micros, MAX_COUNTER)
        ),
    )
