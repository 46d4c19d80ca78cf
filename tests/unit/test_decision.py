"""The decision as pure functions: no server, no store, no clock."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from authz.decision import Allow, Deny, Reservation, decide, screen_request
from authz.keys import generate_key
from authz.models import KeyGrant
from authz.usage.periods import seconds_until_next_period
from ratelimit.limiter import BucketState, LimitKind, LimitResult, QuotaKind, QuotaState
from tests.support.fakes import workspace

KEY = generate_key()
GRANT = KeyGrant("key_1", "ws_test", "sk-oa**********abcd", None)


@pytest.mark.parametrize(
    ("path", "authorization", "code"),
    [
        ("/v1/models", None, "missing_api_key"),
        ("/v1/models", "", "missing_api_key"),
        ("/v1/models", "Token " + KEY, "missing_api_key"),
        ("/v1/models", "Bearer", "missing_api_key"),
        ("/v1/models", "Bearer sk-oais_nope", "invalid_api_key"),
        ("/v1/models", "Bearer " + KEY[:-1] + "!", "invalid_api_key"),
        ("/v1/models?key=" + KEY, "Bearer " + KEY, "api_key_in_url"),
        ("/v1/models?key=%73k-oais_x", None, "api_key_in_url"),
    ],
)
def test_screen_request_denials(path: str, authorization: str | None, code: str) -> None:
    result = screen_request(path, authorization)
    assert isinstance(result, Deny)
    assert result.code == code


def test_screen_request_passes_a_well_formed_key_through() -> None:
    assert screen_request("/v1/models", f"  BEARER   {KEY}  ") == KEY


def _rate(allowed: bool, kind: LimitKind | None = None, *, too_large: bool = False) -> LimitResult:
    return LimitResult(
        allowed=allowed,
        requests=BucketState(
            limit=5, remaining=0 if kind is LimitKind.REQUESTS else 3, reset_seconds=60
        ),
        tokens=BucketState(limit=1000, remaining=200, reset_seconds=48),
        denied_by=kind,
        retry_after_seconds=11.2,
        too_large=too_large,
    )


def test_allow_carries_identity_and_reservation() -> None:
    decision = decide(
        KEY, GRANT, workspace(), reservation=Reservation(42), rate=_rate(True), now_ts=0
    )
    assert isinstance(decision, Allow)
    assert (decision.grant.key_id, decision.workspace.id, decision.reserved_tokens) == (
        "key_1",
        "ws_test",
        42,
    )


def test_rpm_denial_message_names_limit_used_and_retry() -> None:
    decision = decide(
        KEY,
        GRANT,
        workspace(),
        reservation=Reservation(1),
        rate=_rate(False, LimitKind.REQUESTS),
        now_ts=0,
    )
    assert isinstance(decision, Deny)
    assert (decision.status, decision.code, decision.type) == (
        429,
        "rate_limit_exceeded",
        "requests",
    )
    assert "Limit 5, Used 5, Requested 1" in decision.message
    assert "try again in 12s" in decision.message
    assert decision.key_id == "key_1"


def test_tpm_denials() -> None:
    exhausted = decide(
        KEY,
        GRANT,
        workspace(),
        reservation=Reservation(300),
        rate=_rate(False, LimitKind.TOKENS),
        now_ts=0,
    )
    assert isinstance(exhausted, Deny)
    assert exhausted.type == "tokens"
    assert "Limit 1000, Used 800, Requested 300" in exhausted.message
    too_large = decide(
        KEY,
        GRANT,
        workspace(),
        reservation=Reservation(5012),
        rate=_rate(False, LimitKind.TOKENS, too_large=True),
        now_ts=0,
    )
    assert isinstance(too_large, Deny)
    assert "Request too large" in too_large.message
    assert "Limit 1000, Requested 5012" in too_large.message


def test_grace_deadline() -> None:
    grant = KeyGrant("key_1", "ws_test", "m", datetime.fromtimestamp(100, UTC))
    assert isinstance(
        decide(KEY, grant, workspace(), reservation=Reservation(1), rate=None, now_ts=99.9), Allow
    )
    late = decide(KEY, grant, workspace(), reservation=Reservation(1), rate=None, now_ts=100)
    assert isinstance(late, Deny)
    assert late.code == "invalid_api_key"


def test_quota_denial_retries_when_the_month_turns() -> None:
    now_ts = datetime(2026, 11, 27, 12, tzinfo=UTC).timestamp()
    rate = LimitResult(
        allowed=False,
        requests=BucketState(limit=5, remaining=3, reset_seconds=0),
        tokens=BucketState(limit=1000, remaining=900, reset_seconds=0),
        quota_exceeded=QuotaKind.TOKENS,
        quota=QuotaState("2026-11", tokens_used=100, spend_used_micros=0, known=True),
    )
    ws = workspace()
    decision = decide(KEY, GRANT, ws, reservation=Reservation(10), rate=rate, now_ts=now_ts)
    assert isinstance(decision, Deny)
    assert (decision.status, decision.code, decision.type) == (
        429,
        "insufficient_quota",
        "insufficient_quota",
    )
    assert decision.key_id == "key_1"
    assert decision.rate is not None
    assert decision.rate.retry_after_seconds == seconds_until_next_period(now_ts)
    assert decision.rate.retry_after_seconds == 3.5 * 86400
