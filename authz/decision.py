"""The decision, as pure functions: request → key candidate → workspace → limits → answer.

Nothing here does I/O or reads a clock, so every contract row can be tested by calling these
directly. The servicer (check.py) fetches what these need and renders what they return.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from authz.keys import is_well_formed, key_like_in, mask_key
from authz.models import Enforcement, KeyGrant, ModelPrice, StreamingUsage, Workspace
from authz.request import Generation, RequestSummary
from authz.usage.periods import seconds_until_next_period
from authz.usage.pricing import PriceTable, estimate_micros
from ratelimit.estimate import estimate_tokens
from ratelimit.limiter import LimitKind, LimitResult, Quota, QuotaKind
from ratelimit.quota import month_period

INVALID_REQUEST = "invalid_request_error"


@dataclass(frozen=True, slots=True)
class Deny:
    """An answer other than allow: HTTP status plus OpenAI's error fields."""

    status: int
    code: str
    type: str
    message: str
    rate: LimitResult | None = None
    workspace_id: str | None = None
    key_id: str | None = None
    should_retry: bool = True
    """False for a 429 that waiting cannot fix (too large, quota used up): the client is told
    `x-should-retry: false`, which OpenAI's SDKs honour."""


@dataclass(frozen=True, slots=True)
class Allow:
    """Let the request through, tagged with who it is and what it reserved."""

    grant: KeyGrant
    workspace: Workspace
    estimate_tokens: int
    """The Check-time estimate: what the request reserves if it takes from the buckets."""
    rate: LimitResult | None
    fail_open: bool = False
    strip_headers: tuple[str, ...] = ()
    """Request headers to remove before the upstream because they hold a key."""
    shadow_denial: Deny | None = None
    """The 429 a shadow workspace's limits would have answered: admitted anyway, counted, and
    marked upstream."""
    model: str | None = None
    """The model the request named; the charge uses `price`, its price at Check time."""
    price: ModelPrice | None = None

    @property
    def took_from_buckets(self) -> bool:
        """Fail-open did not ask the buckets; a shadow workspace's would-be denial took nothing
        from them (a step debits all of them or none)."""
        return not self.fail_open and self.shadow_denial is None

    @property
    def reserved_tokens(self) -> int:
        """What the TPM bucket holds for this request: nothing to refund for one that took
        nothing, and (signed beside the estimate) nothing to charge it either."""
        return self.estimate_tokens if self.took_from_buckets else 0


Outcome = Allow | Deny
"""What one Check answers (not to be confused with the token bucket's own decision)."""


@dataclass(frozen=True, slots=True)
class Reservation:
    """What a request takes from its workspace if admitted: tokens, and this month's quota."""

    tokens: int
    quota: Quota | None = None
    spend_micros: int = 0
    """Estimated spend in micro-USD (0 without a spend cap or a price)."""
    model: str | None = None
    price: ModelPrice | None = None
    """The price of `model` now: the reservation is signed with it and charged at it."""


def reserve(
    summary: RequestSummary, workspace: Workspace, prices: PriceTable, *, now_ts: float
) -> Reservation:
    """The tokens to reserve, and the month's quota and estimated spend when the workspace
    has a quota or a spend cap (CONTRACT §3; the table per endpoint is in docs/contract.md §3)."""
    completion = 0
    if summary.generation is Generation.COMPLETION:
        completion = summary.max_tokens or workspace.default_completion_tokens
    tokens = estimate_tokens(
        body_bytes=summary.body_bytes, completion_tokens=completion, choices=summary.choices
    )
    cap = workspace.monthly_spend_cap_usd
    price = prices.price_for(summary.model)
    if workspace.monthly_token_quota is None and cap is None:
        return Reservation(tokens=tokens, model=summary.model, price=price)
    # The split between prompt and completion is unknown yet (see estimate_micros).
    spend = 0 if cap is None else estimate_micros(price, tokens)
    quota = Quota(
        period=month_period(now_ts),
        token_quota=workspace.monthly_token_quota,
        spend_cap_micros=None if cap is None else round(cap * 1e6),
    )
    return Reservation(
        tokens=tokens, quota=quota, spend_micros=spend, model=summary.model, price=price
    )


MISSING_KEY = Deny(
    status=401,
    code="missing_api_key",
    type=INVALID_REQUEST,
    message=(
        "You didn't provide an API key. You need to provide your API key in an Authorization "
        "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
    ),
)


OVERLOADED = Deny(
    status=429,
    code="server_overloaded",
    type="server_error",
    message=(
        "The API is over capacity right now and did not run this request; nothing was "
        "counted against your limits. Retry after a second."
    ),
)
"""A Check that queued in the sidecar past its budget (overload, not the workspace's limits):
answered at once, before any cache, database or Redis work, and counted as shed."""

SHED_AFTER = 0.25
"""A Check that waited in the sidecar's queue for more than this share of Envoy's ext_authz
timeout is shed (half a second of the shipped 2 s). Measured: 2,000 simultaneous requests
through one Envoy waited up to 1.25 s unshed, 0.77 s shed (docs/deploy.md, "Bursts")."""

SHED_RETRY_AFTER_S = 1.0
"""The retry-after a shed Check carries: a burst drains within Envoy's timeout."""


def overdue(waited_s: float, envoy_timeout_s: float, *, shed_after: float) -> bool:
    """Whether a Check that waited `waited_s` in the sidecar's queue, of the `envoy_timeout_s`
    Envoy gives it, is to be shed: past `shed_after` of the timeout, answering at once keeps the
    queue short enough that every Check behind it is answered before Envoy gives up."""
    return waited_s > envoy_timeout_s * shed_after


def invalid_key(presented: str) -> Deny:
    """One answer for malformed, unknown, revoked and expired keys: nothing tells them apart."""
    return Deny(
        status=401,
        code="invalid_api_key",
        type=INVALID_REQUEST,
        message=f"Incorrect API key provided: {mask_key(presented)}. "
        "Check the key, or ask a workspace admin for a new one.",
    )


def key_in_url(found: str) -> Deny:
    return Deny(
        status=400,
        code="api_key_in_url",
        type=INVALID_REQUEST,
        message=f"An API key ({mask_key(found)}) was found in the URL. Send keys only in the "
        "Authorization header; URLs end up in logs, so revoke this key and create a new one.",
    )


def screen_request(path: str, authorization: str | None) -> str | Deny:
    """The presented key if the request may go on to a lookup, else the denial.

    A checksum-invalid key is refused here, before any cache, database or Redis work.
    """
    in_url = key_like_in(path)
    if in_url is not None:
        return key_in_url(in_url)
    if authorization is None:
        return MISSING_KEY
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return MISSING_KEY
    presented = credentials.strip()
    if not presented:
        return MISSING_KEY
    if not is_well_formed(presented):
        return invalid_key(presented)
    return presented


def check_grant(presented: str, grant: KeyGrant, now_ts: float) -> Deny | None:
    """A key past its rotation grace deadline answers exactly like a revoked one."""
    if grant.expires_at is not None and now_ts >= grant.expires_at.timestamp():
        # Named for the workspace's own records (metrics, the console's denials), never the body.
        return replace(invalid_key(presented), workspace_id=grant.workspace_id, key_id=grant.key_id)
    return None


def stream_without_usage(
    summary: RequestSummary, grant: KeyGrant, workspace: Workspace
) -> Deny | None:
    """With `--streaming-usage require`, a stream that will not report its usage is refused
    before it takes anything: its tokens could only be estimated."""
    if workspace.streaming_usage is not StreamingUsage.REQUIRE:
        return None
    if not summary.stream or summary.include_usage:
        return None
    return Deny(
        status=400,
        code="stream_usage_required",
        type=INVALID_REQUEST,
        message=f"Workspace {workspace.id} requires streamed responses to report their usage. "
        'Add "stream_options": {"include_usage": true} to the request body.',
        workspace_id=workspace.id,
        key_id=grant.key_id,
        should_retry=False,
    )


def used_of(limit: int, remaining: int) -> int:
    """How much of a bucket is in use, as OpenAI's messages report it."""
    return max(0, limit - remaining)


def rate_limited(workspace: Workspace, requested_tokens: int, rate: LimitResult) -> Deny:
    """OpenAI's 429 for an exhausted bucket, or for a request larger than the TPM limit."""
    retry = max(1, math.ceil(rate.retry_after_seconds))
    if rate.denied_by is LimitKind.REQUESTS:
        used = used_of(rate.requests.limit, rate.requests.remaining)
        message = (
            f"Rate limit reached for workspace {workspace.id} on requests per min (RPM): "
            f"Limit {rate.requests.limit}, Used {used}, Requested 1. "
            f"Please try again in {retry}s."
        )
        kind = LimitKind.REQUESTS
    elif rate.too_large:
        message = (
            f"Request too large for workspace {workspace.id} on tokens per min (TPM): "
            f"Limit {rate.tokens.limit}, Requested {requested_tokens}. "
            "Reduce the input or max_tokens, or ask for a higher TPM limit."
        )
        kind = LimitKind.TOKENS
    else:
        used = used_of(rate.tokens.limit, rate.tokens.remaining)
        message = (
            f"Rate limit reached for workspace {workspace.id} on tokens per min (TPM): "
            f"Limit {rate.tokens.limit}, Used {used}, Requested {requested_tokens}. "
            f"Please try again in {retry}s."
        )
        kind = LimitKind.TOKENS
    return Deny(
        status=429,
        code="rate_limit_exceeded",
        type=kind.value,
        message=message,
        rate=rate,
        workspace_id=workspace.id,
        should_retry=not rate.too_large,
    )


def usd(amount: float) -> str:
    """Dollars with cents, and as many more decimals (to the micro-USD) as the amount has:
    a $0.002 cap prints as such, not as $0.00."""
    text = f"{amount:.6f}".rstrip("0")
    whole, _, decimals = text.partition(".")
    return f"{whole}.{decimals.ljust(2, '0')}"


def quota_exhausted(
    workspace: Workspace, requested_tokens: int, rate: LimitResult, *, now_ts: float
) -> Deny:
    """OpenAI's `insufficient_quota` 429: retrying helps only once the month turns."""
    state = rate.quota
    reset = seconds_until_next_period(now_ts)
    if rate.quota_exceeded is QuotaKind.SPEND:
        cap = workspace.monthly_spend_cap_usd or 0.0
        spent = (state.spend_used_micros if state else 0) / 1e6
        detail = f"monthly spend cap ${usd(cap)}, spent ${usd(spent)}"
    else:
        used = state.tokens_used if state else 0
        detail = (
            f"monthly token quota {workspace.monthly_token_quota}, used {used}, "
            f"requested {requested_tokens}"
        )
    return Deny(
        status=429,
        code="insufficient_quota",
        type="insufficient_quota",
        message=f"You exceeded your current quota for workspace {workspace.id}: {detail}. "
        "It renews at the start of the next month (UTC); ask an admin to raise it.",
        rate=replace(rate, retry_after_seconds=reset),
        workspace_id=workspace.id,
        should_retry=False,
    )


def decide(
    presented: str,
    grant: KeyGrant,
    workspace: Workspace,
    *,
    reservation: Reservation,
    rate: LimitResult | None,
    now_ts: float,
    fail_open: bool = False,
    strip_headers: tuple[str, ...] = (),
) -> Outcome:
    """The answer for a live key, given its reservation and the rate limiter's verdict
    (None: not asked). The servicer runs this after its I/O; tests call it directly."""
    expired = check_grant(presented, grant, now_ts)
    if expired is not None:
        return expired
    requested_tokens = reservation.tokens
    shadow_denial = None
    if rate is not None and not rate.allowed:
        if rate.quota_exceeded is not None:
            denial = quota_exhausted(workspace, requested_tokens, rate, now_ts=now_ts)
        else:
            denial = rate_limited(workspace, requested_tokens, rate)
        # The denial keeps its own rate view: a quota's retry-after runs to the next month.
        denial = replace(denial, key_id=grant.key_id)
        if workspace.enforcement is not Enforcement.SHADOW:
            return denial
        # Shadow admits it, taking nothing from the buckets (see Allow.took_from_buckets).
        shadow_denial = denial
    return Allow(
        grant=grant,
        workspace=workspace,
        estimate_tokens=requested_tokens,
        rate=rate,
        fail_open=fail_open,
        strip_headers=strip_headers,
        shadow_denial=shadow_denial,
        model=reservation.model,
        price=reservation.price,
    )
