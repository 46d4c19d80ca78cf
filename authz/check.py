"""The ext_authz v3 Authorization service: fetch what the decision needs, then render it.

Denials are successful RPCs carrying a denied CheckResponse. Infrastructure failures (the
database for an uncached key, the rate limiter in closed mode) are typed exceptions, counted,
and answered with gRPC UNAVAILABLE so Envoy's `status_on_error` applies. Anything else is a
bug and propagates.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc
from envoy.service.auth.v3.external_auth_pb2 import CheckRequest, CheckResponse

from authz.decision import Allow, Deny, check_grant, invalid_key, screen_request, verdict
from authz.keys import hash_key
from authz.lastused import LastUsedRecorder
from authz.metrics import Metrics
from authz.models import Workspace
from authz.resolver import KeyResolver
from authz.responses import AllowRenderer, render_deny
from authz.store.base import StoreUnavailable
from authz.usage.pricing import PriceTable, model_in_body
from authz.usage.seeding import QuotaSeeder
from ratelimit.estimate import estimate_tokens
from ratelimit.limiter import (
    BucketState,
    LimitKind,
    LimitResult,
    Limits,
    Quota,
    RateLimiter,
    RateLimitUnavailable,
)
from ratelimit.quota import month_period

log = logging.getLogger(__name__)

PARTIAL_BODY_HEADER = "x-envoy-auth-partial-body"


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
        fail_open: bool,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._resolver = resolver
        self._limiter = limiter
        self._metrics = metrics
        self._renderer = renderer
        self._last_used = last_used
        self._prices = prices
        self._seeder = seeder
        self._fail_open = fail_open
        self._wall_clock = wall_clock
        self._latency = metrics.check_latency
        self._allowed = metrics.checks.labels("allow", "")
        self._allowed_open = metrics.checks.labels("allow_fail_open", "")
        self._admitted = metrics.ratelimit_decisions.labels("admitted")
        self._near_requests = metrics.near_limit.labels(LimitKind.REQUESTS.value)
        self._near_tokens = metrics.near_limit.labels(LimitKind.TOKENS.value)

    async def Check(
        self, request: CheckRequest, context: grpc.aio.ServicerContext[CheckRequest, CheckResponse]
    ) -> CheckResponse:
        started = time.perf_counter()
        try:
            decision = await self._decide(request)
        except StoreUnavailable as error:
            self._metrics.checks.labels("error", "store_unavailable").inc()
            log.warning("check: database unavailable for an uncached key: %s", error)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "key store unavailable")
        except RateLimitUnavailable as error:
            self._metrics.checks.labels("error", "ratelimit_unavailable").inc()
            log.warning("check: rate limiter unavailable (failure mode closed): %s", error)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "rate limiter unavailable")
        finally:
            self._latency.observe(time.perf_counter() - started)
        if isinstance(decision, Allow):
            (self._allowed_open if decision.fail_open else self._allowed).inc()
            self._last_used.touch(decision.grant.key_id)
            return self._renderer.render(decision)
        self._metrics.checks.labels("deny", decision.code).inc()
        if decision.workspace_id is not None:
            self._metrics.workspace_denials.labels(
                self._metrics.workspace(decision.workspace_id), f"{decision.code}:{decision.type}"
            ).inc()
        return render_deny(decision)

    async def _decide(self, request: CheckRequest) -> Allow | Deny:
        http = request.attributes.request.http
        headers = http.headers
        screened = screen_request(http.path, headers.get("authorization"))
        if isinstance(screened, Deny):
            return screened
        resolved = await self._resolver.resolve(hash_key(screened))
        if resolved is None:
            return invalid_key(screened)
        grant, workspace = resolved
        now_ts = self._wall_clock()
        expired = check_grant(screened, grant, now_ts)
        if expired is not None:
            return expired
        body = bytes(http.raw_body) if http.raw_body else None
        tokens = estimate_tokens(
            body=body,
            content_length=headers.get("content-length"),
            default_completion_tokens=workspace.default_completion_tokens,
            partial=headers.get(PARTIAL_BODY_HEADER) == "true",
        )
        rate = None
        fail_open = False
        quota, spend = self._quota(workspace, now_ts, body, tokens)
        if workspace.rpm or workspace.tpm or quota is not None:
            try:
                rate = await self._limiter.acquire(
                    workspace.id,
                    Limits(rpm=workspace.rpm, tpm=workspace.tpm),
                    tokens,
                    quota=quota,
                    spend_micros=spend,
                )
            except RateLimitUnavailable:
                if not self._fail_open:
                    raise
                self._metrics.fail_open.inc()
                fail_open = True
            else:
                self._count_rate(workspace.id, rate)
        return verdict(
            grant,
            workspace,
            requested_tokens=tokens,
            rate=rate,
            now_ts=now_ts,
            fail_open=fail_open,
        )

    def _quota(
        self, workspace: Workspace, now_ts: float, body: bytes | None, tokens: int
    ) -> tuple[Quota | None, int]:
        """This month's quota and the request's estimated spend, when the workspace has any."""
        cap = workspace.monthly_spend_cap_usd
        if workspace.monthly_token_quota is None and cap is None:
            return None, 0
        spend = 0
        if cap is not None:
            # The split between prompt and completion is unknown yet: price all of it at the
            # model's higher rate, so the cap is never passed by an underestimate.
            price = self._prices.price_for(model_in_body(body))
            if price is not None:
                spend = round(tokens * max(price.input_per_1m_usd, price.output_per_1m_usd))
        quota = Quota(
            period=month_period(now_ts),
            token_quota=workspace.monthly_token_quota,
            spend_cap_micros=None if cap is None else round(cap * 1e6),
        )
        return quota, spend

    def _count_rate(self, workspace_id: str, rate: LimitResult) -> None:
        if rate.quota is not None and not rate.quota.known:
            self._seeder.request(workspace_id, rate.quota.period)
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
