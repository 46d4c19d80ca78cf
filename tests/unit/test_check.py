"""The Check contract (CONTRACT §2) through a real gRPC server, fakes behind the Protocols."""

from __future__ import annotations

import json
from collections.abc import Mapping

import grpc
import pytest
from envoy.config.core.v3.base_pb2 import HeaderValueOption
from google.rpc import code_pb2

from authz.keys import generate_key, hash_key
from authz.store.base import Change, ChangeKind
from ratelimit.limiter import (
    LimitResult,
    Limits,
    Quota,
    QuotaState,
    RateLimitUnavailable,
    UsageTag,
)
from ratelimit.marks import Folded, SeedStart
from tests.support.checks import (
    bearer,
    check_request,
    denied_headers,
    ok_client_headers,
    ok_upstream_headers,
)
from tests.support.fakes import workspace
from tests.unit.conftest import Sidecar, start_sidecar


def error_of(body: str) -> dict[str, object]:
    parsed = json.loads(body)
    assert set(parsed) == {"error"}
    assert set(parsed["error"]) == {"message", "type", "param", "code"}
    assert parsed["error"]["param"] is None
    return parsed["error"]  # type: ignore[no-any-return]


async def test_missing_key_is_401_missing_api_key(sidecar: Sidecar) -> None:
    for headers in ({}, {"authorization": "Basic dXNlcjpwYXNz"}, {"authorization": "Bearer "}):
        response = await sidecar.stub.Check(check_request(headers=headers))
        assert response.status.code == code_pb2.UNAUTHENTICATED
        assert response.denied_response.status.code == 401
        assert denied_headers(response) == {
            "content-type": "application/json",
            "www-authenticate": "Bearer",
        }
        error = error_of(response.denied_response.body)
        assert (error["code"], error["type"]) == ("missing_api_key", "invalid_request_error")


async def test_scheme_is_case_insensitive(sidecar: Sidecar) -> None:
    key = generate_key()
    sidecar.store.add(key, workspace())
    response = await sidecar.stub.Check(check_request(headers={"authorization": f"bEaReR {key}"}))
    assert response.status.code == code_pb2.OK


async def test_checksum_invalid_key_never_reaches_the_store(sidecar: Sidecar) -> None:
    key = generate_key()
    broken = key[:-1] + ("A" if key[-1] != "A" else "B")
    response = await sidecar.stub.Check(check_request(headers=bearer(broken)))
    assert response.denied_response.status.code == 401
    error = error_of(response.denied_response.body)
    assert error["code"] == "invalid_api_key"
    assert broken not in response.denied_response.body
    assert broken[:5] + "**********" + broken[-4:] in str(error["message"])
    assert sidecar.store.lookups == 0


async def test_unknown_and_revoked_keys_get_byte_identical_answers(sidecar: Sidecar) -> None:
    key = generate_key()
    unknown = await sidecar.stub.Check(check_request(headers=bearer(key)))
    grant = sidecar.store.add(key, workspace())
    sidecar.resolver.on_change(Change(ChangeKind.KEY, hash_key(key).hex()))
    assert (await sidecar.stub.Check(check_request(headers=bearer(key)))).status.code == 0
    del sidecar.store.grants[hash_key(key)]
    sidecar.resolver.on_change(Change(ChangeKind.KEY, hash_key(key).hex()))
    revoked = await sidecar.stub.Check(check_request(headers=bearer(key)))
    assert (
        unknown.denied_response.SerializeToString() == revoked.denied_response.SerializeToString()
    )
    assert revoked.denied_response.status.code == 401
    assert grant.key_id not in revoked.SerializeToString().decode("utf-8", "replace")


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models?key=KEY",
        "/v1/KEY/chat",
        "/v1/models?api_key=sk-oais_short",
        "/v1/models?key=sk%2DREST",  # the key's "-" percent-encoded once
        "/v1/models?key=sk%252DREST",  # twice
        "/v1/models?key=sk%25252525252DREST",  # six times
        "/v1/models?k=%73k-oais_abc",
    ],
)
async def test_key_in_url_is_400(sidecar: Sidecar, path: str) -> None:
    key = generate_key()
    sidecar.store.add(key, workspace())
    sent = path.replace("KEY", key).replace("REST", key[len("sk-") :])
    if "REST" in path:
        assert "sk-oais_" not in sent
    response = await sidecar.stub.Check(check_request(path=sent, headers=bearer(key)))
    assert response.denied_response.status.code == 400
    assert response.status.code == code_pb2.PERMISSION_DENIED
    error = error_of(response.denied_response.body)
    assert (error["code"], error["type"]) == ("api_key_in_url", "invalid_request_error")
    assert key not in response.denied_response.body


async def test_allow_sets_identity_by_overwrite_and_drops_authorization(sidecar: Sidecar) -> None:
    key = generate_key()
    grant = sidecar.store.add(key, workspace("ws_real"))
    spoofed = {**bearer(key), "x-workspace-id": "ws_other", "x-api-key-id": "key_other"}
    response = await sidecar.stub.Check(check_request(headers=spoofed))
    assert response.status.code == code_pb2.OK
    assert ok_upstream_headers(response) == {
        "x-workspace-id": "ws_real",
        "x-api-key-id": grant.key_id,
    }
    actions = {h.append_action for h in response.ok_response.headers}
    assert actions == {HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD}
    assert "authorization" in response.ok_response.headers_to_remove
    assert "x-authz-fail-open" in response.ok_response.headers_to_remove
    metadata = dict(response.dynamic_metadata)
    assert metadata["workspace_id"] == "ws_real"
    assert metadata["key_id"] == grant.key_id
    # No body and no content-length: only the workspace's default completion reservation.
    assert metadata["reserved_tokens"] == 16


async def test_keep_authorization_setting() -> None:
    running, started = await start_sidecar(keep_authorization=True)
    try:
        key = generate_key()
        running.store.add(key, workspace())
        response = await running.stub.Check(check_request(headers=bearer(key)))
        assert "authorization" not in response.ok_response.headers_to_remove
    finally:
        await started.stop()


async def test_repeated_key_costs_one_lookup(sidecar: Sidecar) -> None:
    key = generate_key()
    sidecar.store.add(key, workspace())
    for _ in range(5):
        assert (await sidecar.stub.Check(check_request(headers=bearer(key)))).status.code == 0
    unknown = generate_key()
    for _ in range(5):
        await sidecar.stub.Check(check_request(headers=bearer(unknown)))
    assert sidecar.store.lookups == 2


async def test_store_down_uncached_key_is_unavailable_not_401(sidecar: Sidecar) -> None:
    cached = generate_key()
    sidecar.store.add(cached, workspace())
    await sidecar.stub.Check(check_request(headers=bearer(cached)))
    sidecar.store.down = True
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await sidecar.stub.Check(check_request(headers=bearer(generate_key())))
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    # Cached keys keep working, even after their TTL, while the database is down.
    sidecar.clock.now += 120
    response = await sidecar.stub.Check(check_request(headers=bearer(cached)))
    assert response.status.code == code_pb2.OK


async def test_rpm_burst_then_429_with_headers(sidecar: Sidecar) -> None:
    key = generate_key()
    sidecar.store.add(key, workspace(rpm=5, tpm=0))
    for remaining in (4, 3, 2, 1, 0):
        response = await sidecar.stub.Check(check_request(headers=bearer(key)))
        assert response.status.code == code_pb2.OK
        headers = ok_client_headers(response)
        assert headers["x-ratelimit-limit-requests"] == "5"
        assert headers["x-ratelimit-remaining-requests"] == str(remaining)
    response = await sidecar.stub.Check(check_request(headers=bearer(key)))
    assert response.denied_response.status.code == 429
    headers = denied_headers(response)
    assert headers["retry-after"] == "12"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"] == "1m0s"
    assert "x-should-retry" not in headers  # waiting helps: the SDKs may retry
    error = error_of(response.denied_response.body)
    assert (error["code"], error["type"]) == ("rate_limit_exceeded", "requests")
    assert "Limit 5, Used 5, Requested 1" in str(error["message"])
    # The access log gets the same reason, so the console can count 429s by bucket.
    assert dict(response.dynamic_metadata)["type"] == "requests"


async def test_request_larger_than_tpm_is_429_tokens(sidecar: Sidecar) -> None:
    key = generate_key()
    sidecar.store.add(key, workspace(rpm=0, tpm=1000))
    body = json.dumps({"max_tokens": 5000, "messages": []}).encode()
    response = await sidecar.stub.Check(check_request(headers=bearer(key), body=body))
    assert response.denied_response.status.code == 429
    error = error_of(response.denied_response.body)
    assert (error["code"], error["type"]) == ("rate_limit_exceeded", "tokens")
    assert "Request too large" in str(error["message"])
    assert f"Limit 1000, Requested {5000 + -(-len(body) // 4)}" in str(error["message"])
    # Waiting never makes it fit: no retry-after, and the SDKs are told not to retry.
    headers = denied_headers(response)
    assert headers["x-should-retry"] == "false"
    assert "retry-after" not in headers


async def test_quota_used_up_is_not_worth_retrying(sidecar: Sidecar) -> None:
    from dataclasses import replace

    key = generate_key()
    sidecar.store.add(key, replace(workspace(), monthly_token_quota=0))
    response = await sidecar.stub.Check(check_request(headers=bearer(key)))
    assert response.denied_response.status.code == 429
    assert error_of(response.denied_response.body)["code"] == "insufficient_quota"
    headers = denied_headers(response)
    assert headers["x-should-retry"] == "false"
    assert int(headers["retry-after"]) > 3600  # the month turn, as before


async def test_expired_grace_key_answers_like_revoked(sidecar: Sidecar) -> None:
    from datetime import UTC, datetime

    key = generate_key()
    sidecar.store.add(key, workspace(), expires_at=datetime.fromtimestamp(1500, UTC))
    assert (await sidecar.stub.Check(check_request(headers=bearer(key)))).status.code == 0
    sidecar.clock.now = 1500
    response = await sidecar.stub.Check(check_request(headers=bearer(key)))
    assert response.denied_response.status.code == 401
    assert error_of(response.denied_response.body)["code"] == "invalid_api_key"
    # The access log (not the client) learns whose key it was, for the console's denials.
    metadata = dict(response.dynamic_metadata)
    assert (metadata["decision"], metadata["code"]) == ("deny", "invalid_api_key")
    assert metadata["workspace_id"] == "ws_test"


class DeadLimiter:
    async def acquire(
        self,
        workspace_id: str,
        limits: Limits,
        tokens: int,
        *,
        quota: Quota | None = None,
        spend_micros: int = 0,
    ) -> LimitResult:
        raise RateLimitUnavailable("redis down")

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
        tag: UsageTag | None = None,
    ) -> QuotaState:
        raise RateLimitUnavailable("redis down")

    async def seed_usage(
        self, workspace_id: str, *, period: str, tokens: int, spend_micros: int
    ) -> None:
        raise RateLimitUnavailable("redis down")

    async def fold_ledger(
        self,
        workspace_id: str,
        *,
        period: str,
        replica_id: str,
        position: int,
        tokens: int,
        spend_micros: int,
    ) -> Folded:
        raise RateLimitUnavailable("redis down")

    async def begin_seed(
        self, workspace_id: str, *, period: str, token: str, hold_ms: int
    ) -> SeedStart:
        raise RateLimitUnavailable("redis down")

    async def finish_seed(
        self,
        workspace_id: str,
        *,
        period: str,
        token: str,
        tokens: int,
        spend_micros: int,
        snapshot_marks: Mapping[str, int],
    ) -> bool:
        raise RateLimitUnavailable("redis down")

    async def adjust_tokens(self, workspace_id: str, limits: Limits, delta: int) -> None:
        raise RateLimitUnavailable("redis down")

    async def ping(self) -> bool:
        return False

    async def close(self) -> None:
        return None


@pytest.mark.parametrize("fail_open", [False, True])
async def test_failure_modes(fail_open: bool) -> None:
    running, started = await start_sidecar(fail_open=fail_open, limiter=DeadLimiter())
    try:
        key = generate_key()
        running.store.add(key, workspace(rpm=5))
        if fail_open:
            response = await running.stub.Check(
                check_request(headers={**bearer(key), "x-authz-fail-open": "no"})
            )
            assert response.status.code == code_pb2.OK
            assert ok_upstream_headers(response)["x-authz-fail-open"] == "true"
            assert running.metrics.fail_open._value.get() == 1
        else:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await running.stub.Check(check_request(headers=bearer(key)))
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await started.stop()


async def test_last_used_is_recorded_in_one_batch(sidecar: Sidecar) -> None:
    key = generate_key()
    grant = sidecar.store.add(key, workspace())
    for _ in range(3):
        await sidecar.stub.Check(check_request(headers=bearer(key)))
    assert sidecar.store.used == {}
    await sidecar.last_used.flush()
    assert set(sidecar.store.used) == {grant.key_id}


async def test_a_key_in_another_header_never_reaches_the_upstream(sidecar: Sidecar) -> None:
    key = generate_key()
    other = generate_key()
    sidecar.store.add(key, workspace())
    headers = {
        **bearer(key),
        "x-api-key": key,
        "cookie": "session=1; k=" + other.replace("-", "%252D"),
        "x-look-alike": key[:-1] + ("A" if key[-1] != "A" else "B"),
        "x-note": "sk-oais_short",
    }
    response = await sidecar.stub.Check(check_request(headers=headers))
    assert response.status.code == code_pb2.OK
    removed = list(response.ok_response.headers_to_remove)
    assert {"x-api-key", "cookie"} <= set(removed)
    assert "x-look-alike" not in removed
    assert "x-note" not in removed
    assert removed.count("authorization") == 1
    stripped = sidecar.metrics.registry.get_sample_value("authz_forwarded_keys_stripped_total")
    assert stripped == 2
    assert key not in response.SerializeToString().decode("utf-8", "replace")
