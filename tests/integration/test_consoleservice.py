"""ConsoleService (ListAudit, GetObservations) over real gRPC, on both stores, with
KeyService's sign-in rules."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

from authz.api.gen import console_pb2, console_pb2_grpc
from authz.console.service import ConsoleServicer
from authz.identity import IdentityVerifier, load_issuers
from authz.keys import mint_key
from authz.models import Actor, NewWorkspace
from authz.store.base import Store
from authz.usage.latency import bucket_of
from authz.usage.observed import DenialRow, LatencyRow
from tests.support.idp import TestIdp

pytestmark = pytest.mark.integration

MEMBER = Actor(kind="user", subject="ana@example.com", issuer="https://idp", address="10.0.0.7")


@pytest.fixture
def idp() -> Iterator[TestIdp]:
    provider = TestIdp()
    with provider.serve():
        yield provider


@dataclass
class Api:
    stub: Any
    idp: TestIdp
    workspace_id: str
    other_id: str

    def list(self, workspace_id: str, limit: int = 0, **claims: Any) -> Any:
        claims.setdefault("workspaces", [self.workspace_id])
        token = self.idp.token(**claims)
        request = console_pb2.ListAuditRequest(workspace_id=workspace_id, limit=limit)
        return self.stub.ListAudit(request, metadata=(("authorization", f"Bearer {token}"),))

    def observe(self, workspace_id: str, since: datetime, until: datetime, **claims: Any) -> Any:
        claims.setdefault("workspaces", [self.workspace_id])
        request = console_pb2.GetObservationsRequest(workspace_id=workspace_id)
        request.since.FromDatetime(since)
        request.until.FromDatetime(until)
        token = self.idp.token(**claims)
        return self.stub.GetObservations(request, metadata=(("authorization", f"Bearer {token}"),))


@pytest.fixture
async def api(store: Store, idp: TestIdp) -> AsyncIterator[Api]:
    verifier = IdentityVerifier(load_issuers(json.dumps([idp.config()])), jwks_timeout_s=2)
    server = grpc.aio.server()
    console_pb2_grpc.add_ConsoleServiceServicer_to_server(
        ConsoleServicer(store=store, verifier=verifier), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    acme = await store.create_workspace(NewWorkspace(name="acme"), actor=MEMBER)
    other = await store.create_workspace(NewWorkspace(name="other"), actor=MEMBER)
    for label in ("first", "second"):
        await store.create_key(mint_key(acme.id, label)[1], actor=MEMBER)
    key = await store.create_key(mint_key(other.id, "theirs")[1], actor=MEMBER)
    await store.revoke_key(key.id, actor=MEMBER, reason="leaked")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield Api(console_pb2_grpc.ConsoleServiceStub(channel), idp, acme.id, other.id)
    await server.stop(0)


async def test_the_audit_is_newest_first_for_this_workspace_only(api: Api) -> None:
    answer = await api.list(api.workspace_id)
    entries = [(e.action, e.detail) for e in answer.entries]
    assert entries == [
        ("key.create", "second"),
        ("key.create", "first"),
        ("workspace.create", "acme"),
    ]
    assert {e.actor_subject for e in answer.entries} == {"ana@example.com"}
    assert "10.0.0.7" not in str(answer)  # members do not see each other's addresses
    limited = await api.list(api.workspace_id, limit=1)
    assert [e.detail for e in limited.entries] == ["second"]


@pytest.mark.parametrize(
    ("claims", "code"),
    [
        ({"permissions": []}, grpc.StatusCode.PERMISSION_DENIED),
        ({"workspaces": ["ws_elsewhere"]}, grpc.StatusCode.PERMISSION_DENIED),
    ],
)
async def test_the_key_api_rules_apply(api: Api, claims: dict[str, Any], code: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.list(api.workspace_id, **claims)
    assert caught.value.code() == code


async def test_another_workspace_audit_is_forbidden(api: Api) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.list(api.other_id)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_no_sign_in_is_unauthenticated(api: Api) -> None:
    request = console_pb2.ListAuditRequest(workspace_id=api.workspace_id)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.stub.ListAudit(request)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


HOUR = datetime(2026, 11, 27, 9, tzinfo=UTC)


async def test_observations_give_percentiles_and_denials_per_hour_and_key(
    api: Api, store: Store
) -> None:
    later = HOUR + timedelta(hours=1)
    await store.apply_observation_batch(
        "o1",
        [
            LatencyRow(HOUR, api.workspace_id, "key_old", bucket_of(0.010), 19),
            LatencyRow(HOUR, api.workspace_id, "key_old", bucket_of(2.0), 1),
            LatencyRow(later, api.workspace_id, "key_new", bucket_of(0.100), 4),
            LatencyRow(HOUR, api.other_id, "key_theirs", bucket_of(5.0), 50),
        ],
        [
            DenialRow(later, api.workspace_id, "key_old", "unauthenticated", 3),
            DenialRow(later, api.workspace_id, "key_new", "rate_limit_tokens", 2),
            DenialRow(HOUR, api.other_id, "key_theirs", "insufficient_quota", 9),
        ],
    )
    # Minutes are rounded down to whole hours.
    answer = await api.observe(api.workspace_id, HOUR.replace(minute=30), HOUR + timedelta(hours=2))
    hours = [
        (h.hour.ToDatetime(tzinfo=UTC), h.latency.requests, dict(h.denials)) for h in answer.hours
    ]
    assert hours == [
        (HOUR, 20, {}),
        (later, 4, {"unauthenticated": 3, "rate_limit_tokens": 2}),
    ]
    first = answer.hours[0].latency
    assert 9.5 < first.p50_ms <= 11.32  # the bucket that holds 10 ms
    assert 9.5 < first.p95_ms <= 11.32  # 19 of 20 took 10 ms
    keys = {k.key_id: (k.latency.requests, dict(k.denials)) for k in answer.keys}
    assert keys == {
        "key_old": (20, {"unauthenticated": 3}),
        "key_new": (4, {"rate_limit_tokens": 2}),
    }
    assert answer.total.requests == 24
    assert 90 < answer.total.p95_ms <= 108  # the bucket that holds 100 ms
    empty = await api.observe(api.workspace_id, HOUR - timedelta(days=2), HOUR)
    assert (list(empty.hours), list(empty.keys), empty.total.requests) == ([], [], 0)


async def test_observations_follow_the_key_api_rules(api: Api) -> None:
    since, until = HOUR, HOUR + timedelta(hours=1)
    for call, code in (
        (api.observe(api.other_id, since, until), grpc.StatusCode.PERMISSION_DENIED),
        (
            api.observe(api.workspace_id, since, until, permissions=[]),
            grpc.StatusCode.PERMISSION_DENIED,
        ),
        (api.observe(api.workspace_id, until, since), grpc.StatusCode.INVALID_ARGUMENT),
        (
            api.observe(api.workspace_id, since, since + timedelta(days=40)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == code
    request = console_pb2.GetObservationsRequest(workspace_id=api.workspace_id)
    request.since.FromDatetime(since)
    request.until.FromDatetime(until)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.stub.GetObservations(request)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
