"""Token-bucket maths for a workspace's RPM and TPM buckets, with `now` passed in.

The monthly quota checked before the buckets lives in `ratelimit.quota`; a `LimitDecision` carries
its outcome too, so one script reply holds both.

This module is the reference for `the Lua scripts`: the in-process limiter calls it directly and the
Redis script mirrors it line by line, so both give identical answers for identical inputs (a
property test runs them side by side).

The integer scheme
------------------
Everything is an integer, so Python and Lua (whose numbers are IEEE doubles) agree exactly:

* time is in whole **milliseconds**;
* a bucket's level is in **units**, where one token (or one request) is `UNITS_PER_TOKEN` =
  60 000 units. A bucket with limit `L` per minute then refills exactly `L` units per
  millisecond, so refilling needs no division and loses nothing to rounding;
* limits are capped at `MAX_LIMIT` (10^10 per minute), one report's charge at `MAX_CHARGE`
  (10^10 tokens) and a bucket's debt at `MAX_DEBT` (10^11 tokens), which keeps every value,
  including `elapsed * limit`, `capacity - level` and a level of minus the whole debt less
  one more charge, exact in doubles: `(MAX_LIMIT + MAX_DEBT + MAX_CHARGE) * UNITS_PER_TOKEN`
  = 7.2e15 < 2^53 = 9.007e15.

Bucket rules
------------
* Capacity is the limit; a bucket nobody has touched (or whose state expired) is full.
* Limit 0 means unlimited: always room, reported as limit 0, remaining 0, reset 0.
* A request is admitted only if both buckets have room (RPM needs 1 request, TPM needs the token
  estimate); then both are debited, else neither.
* A token cost above the TPM capacity is `too_large` (denied by TOKENS, waiting never helps, so
  `retry_after` is 0). This takes precedence over a short request bucket.
* Otherwise, when a bucket is short, `denied_by` is REQUESTS if the request bucket is short (it
  is the cheaper thing for a client to reason about), else TOKENS; `retry_after` is the time
  until *every* bucket has room for this request.
* `adjust` charges or refunds tokens after the real usage is known. A refund never fills past
  capacity. A charge is carried whole as debt (it was forgiven past minus one capacity: issue
  17, finding 6): nothing is admitted until refill has paid it and the request fits, which is
  what `retry_after` says. So at any admission, everything charged over any window ending then
  (reservations, reported overuse, minus refunds) is at most `limit * window / 1 min +
  capacity`. Only exactness cuts a charge (`MAX_CHARGE`) or a debt (`MAX_DEBT`), both far past
  any real response (a 10M-token context times n = 128 is ~1.3e9 tokens).
* A bucket whose stored state is gone (a Redis key past its TTL, a swept in-memory entry) is full;
  state is kept until the bucket is full again, so this changes nothing, except that right after
  a limit is *raised* an idle bucket may count as full slightly early (refill uses the new rate).
* A clock that steps backwards (a Redis failover to a host with a skewed clock) grants no
  refill and never moves a bucket's timestamp back.
"""

from __future__ import annotations

from dataclasses import dataclass

from ratelimit.limiter import (
    BucketState,
    LimitKind,
    LimitResult,
    Limits,
    QuotaKind,
    QuotaState,
)

UNITS_PER_TOKEN = 60_000
"""Units per token: with time in ms, a bucket with limit L refills exactly L units per ms."""

MAX_LIMIT = 10**10
"""Limits above this are clamped to it; it keeps all bucket arithmetic below 2^53."""

MAX_CHARGE = 10**10
"""The most one usage report charges past its reservation: an exactness bound only."""

MAX_DEBT = 10**11
"""The deepest debt, in tokens (50 000 minutes at TPM 2000, 10 at MAX_LIMIT): exactness only."""

TTL_MARGIN_MS = 1_000
"""Idle state is kept this long past the moment its bucket is full again."""

MS_PER_SECOND = 1_000
KEEP_MS = 40 * 24 * 3600 * MS_PER_SECOND  # ...and at least as long as the counters: redis_cluster

_DENIED_NONE = 0
_DENIED_REQUESTS = 1
_DENIED_TOKENS = 2

_QUOTA_CODES: dict[QuotaKind | None, int] = {None: 0, QuotaKind.TOKENS: 1, QuotaKind.SPEND: 2}
_QUOTA_KINDS = {code: kind for kind, code in _QUOTA_CODES.items()}

_EXISTED_BITS = ((QuotaKind.TOKENS, 1), (QuotaKind.SPEND, 2))


def missing_from_wire(existed: int) -> frozenset[QuotaKind]:
    """The counters a script's existence mask (1 tokens, 2 spend) says were absent."""
    return frozenset(kind for kind, bit in _EXISTED_BITS if not existed & bit)


def missing_to_wire(missing: frozenset[QuotaKind]) -> int:
    """The existence mask the scripts return for a set of absent counters."""
    return sum(bit for kind, bit in _EXISTED_BITS if kind not in missing)


WIRE_LENGTH = 8
"""Values in the script's reply to an acquire without a quota."""
QUOTA_WIRE_LENGTH = 12
"""With a quota: the 8 above, then quota_exceeded (0/1 tokens/2 spend), tokens and spend used,
and which counters existed (a mask: 1 tokens, 2 spend; 3 = known)."""


@dataclass(frozen=True, slots=True)
class BucketLevel:
    """Stored state of one bucket: its level in units at time `updated_ms`."""

    level: int
    updated_ms: int


@dataclass(frozen=True, slots=True)
class BucketReport:
    """One bucket after a decision, in integers (the wire format of the Lua script)."""

    limit: int
    remaining: int
    reset_ms: int

    def to_state(self) -> BucketState:
        """The public form, with the reset in seconds."""
        return BucketState(
            limit=self.limit,
            remaining=self.remaining,
            reset_seconds=self.reset_ms / MS_PER_SECOND,
        )


@dataclass(frozen=True, slots=True)
class LimitDecision:
    """An exact, integer outcome of one acquire; both backends produce it."""

    allowed: bool
    denied_by: LimitKind | None
    too_large: bool
    retry_after_ms: int
    requests: BucketReport
    tokens: BucketReport
    quota_exceeded: QuotaKind | None = None
    quota: QuotaState | None = None

    def to_result(self) -> LimitResult:
        """The public `LimitResult`, with times in seconds."""
        return LimitResult(
            allowed=self.allowed,
            requests=self.requests.to_state(),
            tokens=self.tokens.to_state(),
            denied_by=self.denied_by,
            retry_after_seconds=self.retry_after_ms / MS_PER_SECOND,
            too_large=self.too_large,
            quota_exceeded=self.quota_exceeded,
            quota=self.quota,
        )

    def to_wire(self) -> tuple[int, ...]:
        """The flat integer tuple `the Lua scripts` returns for the same decision."""
        denied = {None: _DENIED_NONE, LimitKind.REQUESTS: _DENIED_REQUESTS}.get(
            self.denied_by, _DENIED_TOKENS
        )
        buckets = (
            int(self.allowed),
            denied,
            int(self.too_large),
            self.retry_after_ms,
            self.requests.remaining,
            self.requests.reset_ms,
            self.tokens.remaining,
            self.tokens.reset_ms,
        )
        if self.quota is None:
            return buckets
        return (
            *buckets,
            _QUOTA_CODES[self.quota_exceeded],
            self.quota.tokens_used,
            self.quota.spend_used_micros,
            missing_to_wire(self.quota.missing),
        )

    @classmethod
    def from_wire(
        cls, wire: tuple[int, ...], limits: Limits, *, period: str | None = None
    ) -> LimitDecision:
        """Parse the script's reply; `limits` must be the (normalised) limits sent with it, and
        `period` the quota's period when one was sent (the reply then carries the counters)."""
        expected = WIRE_LENGTH if period is None else QUOTA_WIRE_LENGTH
        if len(wire) != expected:
            raise ValueError(f"bucket script returned {len(wire)} values, expected {expected}")
        allowed, denied, too_large, retry_ms, req_rem, req_reset, tok_rem, tok_reset = wire[:8]
        quota_exceeded: QuotaKind | None = None
        quota: QuotaState | None = None
        if period is not None:
            exceeded, tokens_used, spend_used, existed = wire[8:]
            quota_exceeded = _QUOTA_KINDS[exceeded]
            missing = missing_from_wire(existed)
            quota = QuotaState(
                period=period,
                tokens_used=tokens_used,
                spend_used_micros=spend_used,
                known=not missing,
                missing=missing,
            )
        denied_by = {
            _DENIED_NONE: None,
            _DENIED_REQUESTS: LimitKind.REQUESTS,
            _DENIED_TOKENS: LimitKind.TOKENS,
        }[denied]
        return cls(
            allowed=bool(allowed),
            denied_by=denied_by,
            too_large=bool(too_large),
            retry_after_ms=retry_ms,
            requests=BucketReport(limit=limits.rpm, remaining=req_rem, reset_ms=req_reset),
            tokens=BucketReport(limit=limits.tpm, remaining=tok_rem, reset_ms=tok_reset),
            quota_exceeded=quota_exceeded,
            quota=quota,
        )


@dataclass(frozen=True, slots=True)
class Acquisition:
    """A decision plus the bucket states to store (None: leave that bucket's state as it is)."""

    decision: LimitDecision
    requests: BucketLevel | None
    tokens: BucketLevel | None


def normalise_limits(limits: Limits) -> Limits:
    """Clamp limits into [0, MAX_LIMIT]: negative means unlimited, huge means nearly so."""
    return Limits(rpm=_clamp_limit(limits.rpm), tpm=_clamp_limit(limits.tpm))


def _clamp_limit(limit: int) -> int:
    return min(max(limit, 0), MAX_LIMIT)


def normalise_cost(tokens: int) -> int:
    """Clamp a token cost into [0, MAX_LIMIT + 1]: anything above MAX_LIMIT is too large anyway."""
    if tokens < 0:
        raise ValueError(f"token cost must be >= 0, got {tokens}")
    return min(tokens, MAX_LIMIT + 1)


def normalise_delta(delta: int, tpm: int) -> int:
    """Clamp an adjustment into [-2*tpm, MAX_CHARGE].

    A charge is real overuse, and one response can use far more than its TPM (a default
    reservation against a long completion, `n` choices): it is carried whole up to the
    exactness bound `MAX_CHARGE`. A refund gives back at most a reservation, which never
    exceeds the TPM it was admitted under; `2*tpm` leaves room for a limit lowered since, and
    keeps a bogus refund from wiping a debt. An unlimited bucket (tpm 0) takes no delta.
    """
    if not tpm:
        return 0
    return max(-2 * tpm, min(delta, MAX_CHARGE))


def floor_div(a: int, b: int) -> int:
    """Integer floor division (mirrored in Lua with an exactness correction)."""
    return a // b


def ceil_div(a: int, b: int) -> int:
    """Integer ceiling division for a >= 0, b > 0."""
    return floor_div(a + b - 1, b)


def capacity(limit: int) -> int:
    """A bucket's capacity in units."""
    return limit * UNITS_PER_TOKEN


def ms_to_reach(limit: int, level: int, target: int) -> int:
    """Milliseconds until a bucket at `level` has refilled to `target` units (0 if it has)."""
    if level >= target:
        return 0
    return ceil_div(target - level, limit)


def level_at(limit: int, state: BucketLevel | None, now_ms: int) -> BucketLevel:
    """The bucket refilled up to `now_ms` (a missing state is a full bucket)."""
    cap = capacity(limit)
    if state is None:
        return BucketLevel(level=cap, updated_ms=now_ms)
    level = min(state.level, cap)
    if now_ms <= state.updated_ms:
        # The clock went backwards (or stood still): no refill, and keep the later timestamp.
        return BucketLevel(level=level, updated_ms=state.updated_ms)
    # Bounding elapsed time by the time to full keeps `elapsed * limit` small.
    elapsed = min(now_ms - state.updated_ms, ms_to_reach(limit, level, cap))
    return BucketLevel(level=min(cap, level + elapsed * limit), updated_ms=now_ms)


def report(limit: int, level: int) -> BucketReport:
    """What a client is told about a limited bucket at `level` units."""
    remaining = floor_div(level, UNITS_PER_TOKEN) if level > 0 else 0
    return BucketReport(
        limit=limit, remaining=remaining, reset_ms=ms_to_reach(limit, level, capacity(limit))
    )


def ttl_ms(limit: int, level: int) -> int:
    """How long to keep a bucket's state: until it is full again plus a margin, KEEP_MS at least."""
    return max(ms_to_reach(limit, level, capacity(limit)) + TTL_MARGIN_MS, KEEP_MS)


_UNLIMITED = BucketReport(limit=0, remaining=0, reset_ms=0)


def peek(
    limits: Limits,
    *,
    now_ms: int,
    requests: BucketLevel | None,
    tokens: BucketLevel | None,
) -> tuple[BucketReport, BucketReport]:
    """Both buckets as they stand at `now_ms`, debiting nothing (for a denial before them)."""
    req = report(limits.rpm, level_at(limits.rpm, requests, now_ms).level) if limits.rpm else None
    tok = report(limits.tpm, level_at(limits.tpm, tokens, now_ms).level) if limits.tpm else None
    return req or _UNLIMITED, tok or _UNLIMITED


def acquire(
    limits: Limits,
    cost: int,
    *,
    now_ms: int,
    requests: BucketLevel | None,
    tokens: BucketLevel | None,
) -> Acquisition:
    """Check both buckets and debit both or neither. `limits` and `cost` must be normalised."""
    req = level_at(limits.rpm, requests, now_ms) if limits.rpm else None
    tok = level_at(limits.tpm, tokens, now_ms) if limits.tpm else None

    if tok is not None and cost > limits.tpm:
        return Acquisition(
            decision=LimitDecision(
                allowed=False,
                denied_by=LimitKind.TOKENS,
                too_large=True,
                retry_after_ms=0,
                requests=report(limits.rpm, req.level) if req else _UNLIMITED,
                tokens=report(limits.tpm, tok.level),
            ),
            requests=None,
            tokens=None,
        )

    req_need = UNITS_PER_TOKEN
    tok_need = cost * UNITS_PER_TOKEN
    req_wait = ms_to_reach(limits.rpm, req.level, req_need) if req else 0
    tok_wait = ms_to_reach(limits.tpm, tok.level, tok_need) if tok else 0

    if req_wait > 0 or tok_wait > 0:
        return Acquisition(
            decision=LimitDecision(
                allowed=False,
                denied_by=LimitKind.REQUESTS if req_wait > 0 else LimitKind.TOKENS,
                too_large=False,
                retry_after_ms=max(req_wait, tok_wait),
                requests=report(limits.rpm, req.level) if req else _UNLIMITED,
                tokens=report(limits.tpm, tok.level) if tok else _UNLIMITED,
            ),
            requests=None,
            tokens=None,
        )

    req_after = BucketLevel(req.level - req_need, req.updated_ms) if req else None
    tok_after = BucketLevel(tok.level - tok_need, tok.updated_ms) if tok else None
    return Acquisition(
        decision=LimitDecision(
            allowed=True,
            denied_by=None,
            too_large=False,
            retry_after_ms=0,
            requests=report(limits.rpm, req_after.level) if req_after else _UNLIMITED,
            tokens=report(limits.tpm, tok_after.level) if tok_after else _UNLIMITED,
        ),
        requests=req_after,
        tokens=tok_after,
    )


def adjust(tpm: int, delta: int, *, now_ms: int, tokens: BucketLevel | None) -> BucketLevel | None:
    """Charge (delta > 0) or refund (delta < 0) the token bucket; None when it is unlimited.

    `tpm` must be normalised and `delta` clamped with `normalise_delta`. Overuse is carried
    whole as debt (down to `MAX_DEBT`), never forgiven after a minute.
    """
    if not tpm:
        return None
    cap = capacity(tpm)
    current = level_at(tpm, tokens, now_ms)
    delta = max(-MAX_CHARGE, min(delta, MAX_CHARGE))  # exactness guard, as in the Lua twin
    level = max(-MAX_DEBT * UNITS_PER_TOKEN, min(cap, current.level - delta * UNITS_PER_TOKEN))
    return BucketLevel(level=level, updated_ms=current.updated_ms)
