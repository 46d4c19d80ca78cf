"""Shadow enforcement (CONTRACT §3): limits evaluated and counted, every request admitted."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from envoy.config.core.v3.base_pb2 import HeaderValueOption
from envoy.service.auth.v3.external_auth_pb2 import CheckResponse
from google.rpc import code_pb2

from authz.decision import Allow, Deny, Reservation, decide
from authz.keys import generate_key
from authz.models import CLI_ACTOR, Enforcement, KeyGrant, WorkspaceUpdate
from authz.store.common import workspace_change
from ratelimit.limiter import (
    BucketState,
    LimitKind,
    LimitResult,
    Limits,
    Quota,
    QuotaKind,
    QuotaState,
)
from ratelimit.memory import InMemoryRateLimiter
from ratelimit.quota import month_period
from tests.support.accesslogs import from_check, send
from tests.support.checks import bearer, check_request, ok_upstream_headers
from tests.support.clock import FakeClock
from tests.support.fakes import workspace
from tests.unit.conftest import Sidecar, start_sidecar

KEY = generate_key()
GRANT = KeyGrant("key_1", "ws_test", "sk-oa**********abcd", None)
SHADOW = workspace(enforcement=Enforcement.SHADOW)
SHADOW_HEADER = "x-authz-shadow-deny"
NOW = 1_790_000_000.0  # a fixed wall clock for reservations and the ledger


def _denied(kind: LimitKind | None, *, too_large: bool = False) -> LimitResult:
    return LimitResult(
        allowed=False,
        requests=BucketState(limit=5, remaining=0, reset_seconds=60),
        tokens=BucketState(limit=1000, remaining=0, reset_seconds=60),
        denied_by=kind,
        retry_after_seconds=12,
        too_large=too_large,
        quota_exceeded=QuotaKind.TOKENS if kind is None else None,
        quota=QuotaState("2026-01", tokens_used=10, spend_used_micros=0, known=True),
    )


@pytest.mark.parametrize(
    ("rate", "code", "kind"),
    [
        (_denied(LimitKind.REQUESTS), "rate_limit_exceeded", "requests"),
        (_denied(LimitKind.TOKENS), "rate_limit_exceeded", "tokens"),
        (_denied(LimitKind.TOKENS, too_large=True), "rate_limit_exceeded", "tokens"),
        (_denied(None), "insufficient_quota", "insufficient_quota"),
    ],
)
def test_shadow_admits_what_enforce_denies(rate: LimitResult, code: str, kind: str) -> None:
    enforced = decide(KEY, GRANT, workspace(), reservation=Reservation(40), rate=rate, now_ts=0)
    assert isinstance(enforced, Deny)
    shadowed = decide(KEY, GRANT, SHADOW, reservation=Reservation(40), rate=rate, now_ts=0)
    assert isinstance(shadowed, Allow)
    # The very denial enforce would answer, kept for the count and the upstream mark.
    assert shadowed.shadow_denial == enforced
    assert (shadowed.shadow_denial.code, shadowed.shadow_denial.type) == (code, kind)
    # The limiter took nothing (all or none), so reconciliation must refund nothing, nor
    # charge anything; the estimate stays, for usage that is never reported.
    assert (shadowed.reserved_tokens, shadowed.estimate_tokens) == (0, 40)
    assert not shadowed.took_from_buckets
    assert shadowed.rate is rate


def test_shadow_changes_nothing_for_allowed_or_unauthenticated_requests() -> None:
    allowed = LimitResult(
        allowed=True,
        requests=BucketState(limit=5, remaining=4, reset_seconds=12),
        tokens=BucketState(limit=0, remaining=0, reset_seconds=0),
    )
    shadowed = decide(KEY, GRANT, SHADOW, reservation=Reservation(40), rate=allowed, now_ts=0)
    assert isinstance(shadowed, Allow)
    assert (shadowed.shadow_denial, shadowed.reserved_tokens) == (None, 40)
    assert shadowed.took_from_buckets
    # Shadow is about limits: a key past its grace deadline is refused all the same.
    expired = replace(GRANT, expires_at=datetime.fromtimestamp(10, UTC))
    late = decide(KEY, expired, SHADOW, reservation=Reservation(1), rate=None, now_ts=10)
    assert isinstance(late, Deny)
    assert late.code == "invalid_api_key"


def test_enforcement_changes_are_audited_like_every_field() -> None:
    before = workspace()
    after = replace(before, enforcement=Enforcement.SHADOW)
    assert workspace_change(before, after) == "enforcement enforce \u2192 shadow"


def _shadow_mark(response: CheckResponse) -> str | None:
    return ok_upstream_headers(response).get(SHADOW_HEADER)


def _shadow_count(sidecar: Sidecar, workspace_id: str, reason: str) -> float:
    value = sidecar.metrics.registry.get_sample_value(
        "authz_shadow_denials_total", {"workspace": workspace_id, "reason": reason}
    )
    return value or 0.0


async def test_shadow_workspace_over_its_rpm_is_admitted_marked_and_counted(
    sidecar: Sidecar,
) -> None:
    key = generate_key()
    sidecar.store.add(key, workspace("ws_shadow", rpm=2, enforcement=Enforcement.SHADOW))
    # A client's own mark never reaches the upstream, on a plain allow or a shadow one.
    spoofed = {**bearer(key), SHADOW_HEADER: "rate_limit_exceeded:requests"}
    answers = [await sidecar.stub.Check(check_request(headers=spoofed)) for _ in range(4)]
    assert [a.status.code for a in answers] == [code_pb2.OK] * 4
    assert [_shadow_mark(a) for a in answers] == [None, None] + ["rate_limit_exceeded:requests"] * 2
    for admitted in answers[:2]:
        assert SHADOW_HEADER in admitted.ok_response.headers_to_remove
    for marked in answers[2:]:
        assert {h.append_action for h in marked.ok_response.headers} == {
            HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
        }
        assert marked.dynamic_metadata["reserved_tokens"] == 0
        assert marked.dynamic_metadata["took_from_buckets"] is False
    assert _shadow_count(sidecar, "ws_shadow", "rate_limit_exceeded:requests") == 2
    # Shadow denials are not real ones.
    denied = sidecar.metrics.registry.get_sample_value(
        "authz_checks_total", {"decision": "deny", "code": "rate_limit_exceeded"}
    )
    assert not denied


async def test_switching_to_enforce_goes_live_through_the_change_feed(sidecar: Sidecar) -> None:
    key = generate_key()
    sidecar.store.add(key, workspace("ws_switch", rpm=1, enforcement=Enforcement.SHADOW))
    for _ in range(2):
        assert (await sidecar.stub.Check(check_request(headers=bearer(key)))).status.code == 0
    invalidations = sidecar.metrics.invalidations.labels("ws")
    seen = invalidations._value.get()
    # Another replica (or the CLI) flips the mode; this sidecar hears it on its change feed.
    cli = sidecar.store.another()
    update = WorkspaceUpdate(enforcement=Enforcement.ENFORCE)
    await cli.update_workspace("ws_switch", update, actor=CLI_ACTOR)
    async with asyncio.timeout(5):
        while invalidations._value.get() == seen:
            await asyncio.sleep(0)
    response = await sidecar.stub.Check(check_request(headers=bearer(key)))
    assert response.denied_response.status.code == 429
    assert _shadow_count(sidecar, "ws_switch", "rate_limit_exceeded:requests") == 1


async def _wait_for_workspace_change(
    sidecar: Sidecar, workspace_id: str, update: WorkspaceUpdate
) -> None:
    invalidations = sidecar.metrics.invalidations.labels("ws")
    seen = invalidations._value.get()
    await sidecar.store.another().update_workspace(workspace_id, update, actor=CLI_ACTOR)
    async with asyncio.timeout(5):
        while invalidations._value.get() == seen:
            await asyncio.sleep(0)


async def test_shadow_would_be_denials_leave_no_debt_but_count_in_full() -> None:
    """Usage of requests enforce would have refused is the month's and the ledger's, never the
    TPM bucket's: switched to enforce, the workspace is not first made to wait off debt for
    requests it would never have run."""
    clock = FakeClock(NOW)
    limiter = InMemoryRateLimiter(clock_ms=clock.ms)
    sidecar, started = await start_sidecar(limiter=limiter, clock=clock)
    try:
        key = generate_key()
        shadow = replace(workspace("ws_preview", tpm=100), monthly_token_quota=10**6)
        sidecar.store.add(key, replace(shadow, enforcement=Enforcement.SHADOW))
        body = json.dumps({"model": "gpt", "max_tokens": 40}).encode()  # 34 bytes: 9 + 40

        async def check() -> CheckResponse:
            response = await sidecar.stub.Check(check_request(headers=bearer(key), body=body))
            assert response.status.code == code_pb2.OK
            return response

        answers = [await check() for _ in range(7)]
        assert [_shadow_mark(a) is not None for a in answers] == [False] * 2 + [True] * 5
        started_at = datetime.fromtimestamp(clock.now, UTC)
        used = {"prompt_tokens": 12, "completion_tokens": 37}  # 49, as estimated
        entries = [from_check(a, used, started=started_at) for a in answers]
        # One more would-be denial, a stream that never reports its usage: its estimate.
        unreported = await check()
        entries.append(from_check(unreported, None, started=started_at))
        await send(sidecar.address, entries)
        await started.app.accountant.flush()
        rows = [r for batch in sidecar.store.batches.values() for r in batch]
        assert sum(r.requests for r in rows) == 8
        assert sum(r.tokens for r in rows) == 8 * 49
        assert sum(r.estimated_tokens for r in rows) == 49
        quota = Quota(month_period(clock.now), token_quota=10**6, spend_cap_micros=None)
        counted = await limiter.acquire("ws_preview", Limits(rpm=0, tpm=0), 0, quota=quota)
        assert counted.quota is not None
        assert counted.quota.tokens_used == 8 * 49

        await _wait_for_workspace_change(
            sidecar, "ws_preview", WorkspaceUpdate(enforcement=Enforcement.ENFORCE)
        )
        # The two admitted requests left 2 of 100; 29 s refill 48 more, and 50 fit 49. The
        # five reported would-be denials charged as debt would have left it 243 short instead.
        clock.now += 29
        admitted = await sidecar.stub.Check(check_request(headers=bearer(key), body=body))
        assert admitted.status.code == code_pb2.OK
        assert _shadow_mark(admitted) is None
    finally:
        await started.stop()
