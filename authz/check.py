"""The ext_authz v3 Authorization service: fetch what the decision needs, then render it.

Denials are successful RPCs carrying a denied CheckResponse. A Check that queued in the sidecar
past its budget (overload) is answered at once with a pre-rendered 429, before any lookup.
Infrastructure failures (the database for an uncached key, the rate limiter in closed mode) are
typed exceptions, counted, and answered with gRPC UNAVAILABLE so Envoy's `status_on_error`
applies. Anything else is a bug and propagates.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc
from envoy.service.auth.v3.external_auth_pb2 import CheckRequest, CheckResponse
from prometheus_client import Counter

from authz.decision import (
    OVERLOADED,
    SHED_AFTER,
    SHED_RETRY_AFTER_S,
    Allow,
    Deny,
    Outcome,
    Reservation,
    check_grant,
    decide,
    invalid_key,
    overdue,
    reserve,
    screen_request,
    stream_without_usage,
)
from authz.keys import hash_key
from authz.lastused import LastUsedRecorder
from authz.logs import ThrottledLog
from authz.metrics import Metrics
from authz.request import summarize
from authz.resolver import KeyResolver
from authz.responses import AllowRenderer, render_deny, render_shed
from authz.store.base import StoreUnavailable
from authz.tracing import CheckTracing, traced_call
from authz.usage.pricing import PriceTable
from authz.usage.reservations import Keyring, Signed, claims_for
from authz.usage.seeding import QuotaSeeder
from ratelimit.limiter import (
    BucketState,
    LimitKind,
    LimitResult,
    Limits,
    RateLimiter,
    RateLimitUnavailable,
)

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[CheckRequest, CheckResponse]

EXPECTED_TIMEOUT_HEADER = "x-envoy-expected-rq-timeout-ms"
"""Envoy's ext_authz timeout, sent with every Check beside the gRPC deadline it sets from it."""
_MAX_TIMEOUT_DIGITS = 9


def queue_wait(context: Context) -> tuple[float, float] | None:
    """(seconds this Check waited since it reached the sidecar, Envoy's timeout in seconds).

    gRPC set the call's deadline from Envoy's timeout when the call arrived, so the timeout
    minus what remains of it is the wait, on this host's monotonic clock (no skew with
    Envoy's). None without a deadline or without Envoy's header: nothing is shed then.
    """
    remaining = context.time_remaining()
    if remaining is None:
        return None
    for name, value in context.invocation_metadata() or ():
        if name == EXPECTED_TIMEOUT_HEADER:
            if not (value.isascii() and value.isdigit()) or len(value) > _MAX_TIMEOUT_DIGITS:
                return None
            timeout = int(value) / 1000
            return timeout - remaining, timeout
    return None


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """`envoy.service.auth.v3.Authorization/Check`."""

    def __init__(
        self,
        *,
        resolver: KeyResolver,
        limiter: RateLimiter,
        metrics: Metrics,
        renderer: AllowRenderer,
        last_used: LastUsedRecorder,
        prices: PriceTable,
        seeder: QuotaSeeder,
        keyring: Keyring,
        fail_open: bool,
        max_request_bytes: int,
        wall_clock: Callable[[], float] = time.time,
        tracing: CheckTracing | None = None,
        shed_after: float = SHED_AFTER,
        denials: Callable[[Deny], None] | None = None,
    ) -> None:
        self._resolver = resolver
        self._limiter = limiter
        self._metrics = metrics
        self._renderer = renderer
        self._last_used = last_used
        self._prices = prices
        self._seeder = seeder
        self._keyring = keyring
        self._fail_open = fail_open
        self._max_request_bytes = max_request_bytes
        self._wall_clock = wall_clock
        self._tracing = tracing
        self._denials = denials
        """Told every denial (the Observability page's source: authz/usage/observations.py)."""
        self._warnings = ThrottledLog(log)
        self._latency = metrics.check_latency
        self._allowed = metrics.checks.labels("allow", "")
        self._allowed_open = metrics.checks.labels("allow_fail_open", "")
        self._admitted = metrics.ratelimit_decisions.labels("admitted")
        self._near_requests = metrics.near_limit.labels(LimitKind.REQUESTS.value)
        self._near_tokens = metrics.near_limit.labels(LimitKind.TOKENS.value)
        self._shed_after = shed_after
        self._shed = metrics.checks.labels("shed", OVERLOADED.code)
        self._shed_response = render_shed(OVERLOADED, retry_after_s=SHED_RETRY_AFTER_S)

    async def Check(self, request: CheckRequest, context: Context) -> CheckResponse:
        if self._overdue(context):
            # Overload, not failure: a prompt 429 the client may retry, never Envoy's 503.
            self._shed.inc()
            return self._shed_response
        if self._tracing is None:
            return await self._check(request, context)
        with self._tracing.check(request.attributes.request.http.headers):
            return await self._check(request, context)

    async def _check(self, request: CheckRequest, context: Context) -> CheckResponse:
        started = time.perf_counter()
        try:
            outcome = await self._decide(request)
        except StoreUnavailable as error:
            self._metrics.checks.labels("error", "store_unavailable").inc()
            self._warnings.warning(
                "store", "check: database unavailable for an uncached key: %s", error
            )
            await context.abort(grpc.StatusCode.UNAVAILABLE, "key store unavailable")
        except RateLimitUnavailable as error:
            self._metrics.checks.labels("error", "ratelimit_unavailable").inc()
            self._warnings.warning(
                "ratelimit", "check: rate limiter unavailable (failure mode closed): %s", error
            )
            await context.abort(grpc.StatusCode.UNAVAILABLE, "rate limiter unavailable")
        finally:
            self._latency.observe(time.perf_counter() - started)
        if self._tracing is not None:
            self._tracing.outcome(outcome)
        if isinstance(outcome, Allow):
            (self._allowed_open if outcome.fail_open else self._allowed).inc()
            self._last_used.touch(outcome.grant.key_id)
            if outcome.strip_headers:
                self._metrics.keys_stripped.inc(len(outcome.strip_headers))
            if outcome.shadow_denial is not None:
                self._count_denial(self._metrics.shadow_denials, outcome.shadow_denial)
            return self._renderer.render(outcome, self._sign(outcome))
        self._metrics.checks.labels("deny", outcome.code).inc()
        self._count_denial(self._metrics.workspace_denials, outcome)
        if self._denials is not None:
            self._denials(outcome)
        return render_deny(outcome)

    def _overdue(self, context: Context) -> bool:
        waited = queue_wait(context)
        return waited is not None and overdue(*waited, shed_after=self._shed_after)

    def _count_denial(self, counter: Counter, denial: Deny) -> None:
        """One denial (real or shadow) of a known workspace, by `code:type`."""
        if denial.workspace_id is not None:
            label = self._metrics.workspace(denial.workspace_id)
            counter.labels(label, f"{denial.code}:{denial.type}").inc()

    async def _decide(self, request: CheckRequest) -> Outcome:
        http = request.attributes.request.http
        screened = screen_request(http.path, http.headers.get("authorization"))
        if isinstance(screened, Deny):
            return screened
        resolved = await self._resolver.resolve(hash_key(screened))
        if resolved is None:
            return invalid_key(screened)
        grant, workspace = resolved
        now_ts = self._wall_clock()
        # An expired key is refused before it can take anything from the buckets.
        expired = check_grant(screened, grant, now_ts)
        if expired is not None:
            return expired
        summary = summarize(http, max_request_bytes=self._max_request_bytes)
        refused = stream_without_usage(summary, grant, workspace)
        if refused is not None:
            return refused
        reservation = reserve(summary, workspace, self._prices, now_ts=now_ts)
        rate = None
        fail_open = False
        if workspace.rpm or workspace.tpm or reservation.quota is not None:
            limits = Limits(rpm=workspace.rpm, tpm=workspace.tpm)
            try:
                rate = await self._acquire_seeded(workspace.id, limits, reservation)
            except RateLimitUnavailable:
                if not self._fail_open:
                    raise
                self._metrics.fail_open.inc()
                fail_open = True
            else:
                self._count_rate(workspace.id, rate)
        return decide(
            screened,
            grant,
            workspace,
            reservation=reservation,
            rate=rate,
            now_ts=now_ts,
            fail_open=fail_open,
            strip_headers=summary.key_headers,
        )

    def _sign(self, allow: Allow) -> Signed | None:
        return self._keyring.sign(
            claims_for(
                workspace_id=allow.workspace.id,
                key_id=allow.grant.key_id,
                reserved_tokens=allow.reserved_tokens,
                now_ts=self._wall_clock(),
                model=allow.model,
                price=allow.price,
                estimate_tokens=allow.estimate_tokens,
                took_from_buckets=allow.took_from_buckets,
            )
        )

    async def _acquire_seeded(
        self, workspace_id: str, limits: Limits, reservation: Reservation
    ) -> LimitResult:
        """Acquire; when the month's counters are missing, seed them from the ledger (one seed
        per workspace, shared by concurrent Checks) and acquire again: never admit on a zero.
        Raises RateLimitUnavailable when the seed fails, for the failure mode to decide."""
        rate = await self._acquire(workspace_id, limits, reservation)
        if rate.allowed or rate.quota is None or rate.quota.known:
            return rate
        await self._seeder.ensure(workspace_id, rate.quota.period)
        rate = await self._acquire(workspace_id, limits, reservation)
        if rate.quota is not None and not rate.quota.known:
            raise RateLimitUnavailable("quota counters missing again right after seeding")
        return rate

    async def _acquire(
        self, workspace_id: str, limits: Limits, reservation: Reservation
    ) -> LimitResult:
        with traced_call(self._tracing, "ratelimit acquire"):
            return await self._limiter.acquire(
                workspace_id,
                limits,
                reservation.tokens,
                quota=reservation.quota,
                spend_micros=reservation.spend_micros,
            )

    def _count_rate(self, workspace_id: str, rate: LimitResult) -> None:
        if not rate.allowed:
            if rate.quota_exceeded is not None:
                result = f"quota_{rate.quota_exceeded.value}"
            elif rate.too_large:
                result = "too_large"
            elif rate.denied_by is LimitKind.REQUESTS:
                result = "denied_requests"
            else:
                result = "denied_tokens"
            self._metrics.ratelimit_decisions.labels(result).inc()
            return
        self._admitted.inc()
        if _near(rate.requests):
            self._near_requests.inc()
        if _near(rate.tokens):
            self._near_tokens.inc()


def _near(bucket: BucketState) -> bool:
    return bucket.limit > 0 and bucket.remaining * 10 < bucket.limit
