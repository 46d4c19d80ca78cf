"""KeyService over real gRPC, on both stores, signed in through the loopback identity provider."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.json_format import MessageToDict

from authz.api.gen import keys_pb2, keys_pb2_grpc
from authz.identity import IdentityVerifier, load_issuers
from authz.keys import generate_key, hash_key, is_well_formed
from authz.keyservice import KeyServicer, client_address
from authz.models import CLI_ACTOR, Enforcement, NewWorkspace, UsageRow, WorkspaceUpdate
from authz.rotation import rotation_label
from authz.store.base import Change, ChangeKind, Store
from tests.support.idp import TestIdp, new_ec_key

pytestmark = pytest.mark.integration

LIMIT_MESSAGE = "key limit reached: revoke an unused key before generating a replacement"


@pytest.fixture(scope="module")
def idp_keys() -> TestIdp:
    return TestIdp()


@pytest.fixture
def idp(idp_keys: TestIdp) -> Iterator[TestIdp]:
    fresh = TestIdp(rsa_key=idp_keys.rsa_key, ec_key=idp_keys.ec_key)
    with fresh.serve():
        yield fresh


@dataclass
class Api:
    stub: Any
    idp: TestIdp
    store: Store
    workspace_id: str

    def auth(self, token: str | None = None, **claims: Any) -> tuple[tuple[str, str], ...]:
        claims.setdefault("workspaces", [self.workspace_id])
        return (("authorization", f"Bearer {token or self.idp.token(**claims)}"),)

    async def create(self, label: str = "app", **claims: Any) -> keys_pb2.CreateKeyResponse:
        request = keys_pb2.CreateKeyRequest(workspace_id=self.workspace_id, label=label)
        answer: keys_pb2.CreateKeyResponse = await self.stub.CreateKey(
            request, metadata=self.auth(**claims)
        )
        return answer


@asynccontextmanager
async def key_service(store: Store, *issuers: dict[str, Any]) -> AsyncIterator[Any]:
    """The KeyService on a loopback port, trusting `issuers`; yields a stub."""
    verifier = IdentityVerifier(load_issuers(json.dumps(list(issuers))), jwks_timeout_s=2)
    server = grpc.aio.server()
    keys_pb2_grpc.add_KeyServiceServicer_to_server(
        KeyServicer(store=store, verifier=verifier), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield keys_pb2_grpc.KeyServiceStub(channel)
    finally:
        await server.stop(0)


@pytest.fixture
async def api(store: Store, idp: TestIdp) -> AsyncIterator[Api]:
    workspace = await store.create_workspace(
        NewWorkspace(name="acme", key_limit=3), actor=CLI_ACTOR
    )
    async with key_service(store, idp.config()) as stub:
        yield Api(stub, idp, store, workspace.id)


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


# Create, list, get


async def test_create_returns_the_secret_once_and_lists_show_masks(api: Api) -> None:
    created = await api.create("billing-worker")
    secret = created.secret
    assert is_well_formed(secret)
    assert created.key.mask == secret[:5] + "*" * 10 + secret[-4:]
    assert created.key.label == "billing-worker"
    assert created.key.active
    stored = await api.store.get_key_by_hash(hash_key(secret))
    assert stored is not None
    assert stored.id == created.key.id

    listed = await api.stub.ListKeys(
        keys_pb2.ListKeysRequest(workspace_id=api.workspace_id), metadata=api.auth()
    )
    got = await api.stub.GetKey(
        keys_pb2.GetKeyRequest(workspace_id=api.workspace_id, key_id=created.key.id),
        metadata=api.auth(),
    )
    assert [k.id for k in listed.keys] == [created.key.id]
    assert got == listed.keys[0]
    for message in (listed, got):
        assert secret not in str(message)
        assert secret[8:-6] not in message.SerializeToString().decode("latin-1")


@pytest.mark.parametrize(
    ("label", "why"),
    [("", "must not be empty"), ("a\nb", "control characters"), ("x" * 129, "at most 128")],
)
async def test_labels_are_validated(api: Api, label: str, why: str) -> None:
    error = await rpc_error(api.create(label))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert why in (error.details() or "")


async def test_a_label_holding_a_key_is_refused(api: Api) -> None:
    error = await rpc_error(api.create(f"oops {generate_key()}"))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "label must not contain an API key" in (error.details() or "")


async def test_concurrent_creates_never_exceed_the_key_limit(api: Api) -> None:
    results = await asyncio.gather(
        *(api.create(f"w{i}") for i in range(12)), return_exceptions=True
    )
    created = [r for r in results if isinstance(r, keys_pb2.CreateKeyResponse)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(created) == 3
    assert len(refused) == 9
    assert {(e.code(), e.details()) for e in refused} == {
        (grpc.StatusCode.FAILED_PRECONDITION, LIMIT_MESSAGE)
    }
    live = [k for k in await api.store.list_keys(api.workspace_id) if k.active]
    assert len(live) == 3


# Sign-in and permissions at the RPC level


async def test_sign_in_matrix(api: Api, idp: TestIdp) -> None:
    request = keys_pb2.ListKeysRequest(workspace_id=api.workspace_id)
    ws = [api.workspace_id]
    unauthenticated = {
        "missing": (),
        "api key": (("authorization", f"Bearer {generate_key()}"),),
        "expired": api.auth(idp.token(workspaces=ws, expires_in=-120)),
        "wrong audience": api.auth(idp.token(workspaces=ws, audience="elsewhere")),
        "unsupported issuer": api.auth(idp.token(workspaces=ws, issuer="https://other.example")),
        "bad signature": api.auth(idp.token(workspaces=ws, key=new_ec_key(), alg="ES256")),
    }
    for case, metadata in unauthenticated.items():
        error = await rpc_error(api.stub.ListKeys(request, metadata=metadata))
        assert error.code() is grpc.StatusCode.UNAUTHENTICATED, case
        trailers: Any = error.trailing_metadata()  # grpc.aio.Metadata; the stubs say otherwise
        assert trailers.get("www-authenticate") == "Bearer", case
    error = await rpc_error(api.stub.ListKeys(request, metadata=unauthenticated["api key"]))
    assert "an API key cannot manage keys" in (error.details() or "")
    error = await rpc_error(
        api.stub.ListKeys(request, metadata=unauthenticated["unsupported issuer"])
    )
    assert "unsupported sign-in provider" in (error.details() or "")

    forbidden = {
        "no permission": api.auth(permissions=["keys:read"]),
        "wrong workspace": api.auth(workspaces=["ws_someone_else"]),
    }
    for case, metadata in forbidden.items():
        error = await rpc_error(api.stub.ListKeys(request, metadata=metadata))
        assert error.code() is grpc.StatusCode.PERMISSION_DENIED, case


async def test_forbidden_callers_change_nothing(api: Api) -> None:
    error = await rpc_error(api.create("x", workspaces=["ws_other"]))
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert await api.store.list_keys(api.workspace_id) == []


async def test_another_workspaces_key_is_not_found(api: Api) -> None:
    other = await api.store.create_workspace(NewWorkspace(name="other"), actor=CLI_ACTOR)
    theirs = await api.stub.CreateKey(
        keys_pb2.CreateKeyRequest(workspace_id=other.id, label="theirs"),
        metadata=api.auth(workspaces=[other.id]),
    )
    mine = api.auth(workspaces=[api.workspace_id])
    for call in (
        api.stub.GetKey(
            keys_pb2.GetKeyRequest(workspace_id=api.workspace_id, key_id=theirs.key.id),
            metadata=mine,
        ),
        api.stub.RevokeKey(
            keys_pb2.RevokeKeyRequest(workspace_id=api.workspace_id, key_id=theirs.key.id),
            metadata=mine,
        ),
        api.stub.RotateKey(
            keys_pb2.RotateKeyRequest(workspace_id=api.workspace_id, key_id=theirs.key.id),
            metadata=mine,
        ),
    ):
        error = await rpc_error(call)
        assert error.code() is grpc.StatusCode.NOT_FOUND
    still = await api.store.get_key(theirs.key.id)
    assert still is not None
    assert still.active


# Revoke and audit


async def test_revoke_as_leaked_is_audited_with_who_and_where(api: Api, idp: TestIdp) -> None:
    created = await api.create("ci")
    metadata = (
        *api.auth(subject="bob@example.com"),
        ("x-forwarded-for", "10.9.9.9, 192.0.2.2"),  # claims: ignored
        ("x-envoy-external-address", "203.0.113.7"),  # what Envoy saw, as it sends it
    )
    revoked = await api.stub.RevokeKey(
        keys_pb2.RevokeKeyRequest(
            workspace_id=api.workspace_id, key_id=created.key.id, leaked=True
        ),
        metadata=metadata,
    )
    assert not revoked.active
    assert revoked.HasField("revoked_at")
    assert await api.store.lookup_key(hash_key(created.secret)) is None
    entries = await api.store.list_audit(api.workspace_id)
    revoke = next(e for e in entries if e.action == "key.revoke")
    assert revoke.key_id == created.key.id
    assert revoke.detail == "leaked"
    assert (revoke.actor_kind, revoke.actor_subject, revoke.actor_issuer) == (
        "user",
        "bob@example.com",
        idp.issuer,
    )
    assert revoke.actor_address is not None
    assert revoke.actor_address.startswith("203.0.113.7 via 127.0.0.1:")
    create = next(e for e in entries if e.action == "key.create")
    assert create.actor_subject == "alice@example.com"


# Rotation


async def test_rotation_keeps_the_old_key_until_revoked(api: Api) -> None:
    old = await api.create("payments-api")
    rotated = await api.stub.RotateKey(
        keys_pb2.RotateKeyRequest(workspace_id=api.workspace_id, key_id=old.key.id),
        metadata=api.auth(),
    )
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    assert rotated.replacement.label == f"payments-api (rotated {today})"
    assert is_well_formed(rotated.secret)
    assert rotated.secret != old.secret
    assert rotated.previous.active
    assert not rotated.previous.HasField("expires_at")
    for secret in (old.secret, rotated.secret):
        assert await api.store.lookup_key(hash_key(secret)) is not None
    actions = [(e.action, e.key_id) for e in await api.store.list_audit(api.workspace_id)]
    assert ("key.rotate", old.key.id) in actions
    assert ("key.create", rotated.replacement.id) in actions


async def test_rotation_with_grace_sets_the_deadline_and_tells_every_replica(api: Api) -> None:
    old = await api.create("etl")
    seen: list[Change] = []
    listening = asyncio.Event()

    class Sink:
        def on_change(self, change: Change) -> None:
            seen.append(change)

        def on_reset(self) -> None:
            listening.set()

    watcher = asyncio.create_task(api.store.watch_changes(Sink()))
    try:
        # Both stores reset their sink once they watch: nothing after that is missed.
        async with asyncio.timeout(5):
            await listening.wait()
        before = datetime.now(UTC)
        rotated = await api.stub.RotateKey(
            keys_pb2.RotateKeyRequest(
                workspace_id=api.workspace_id,
                key_id=old.key.id,
                grace_period=Duration(seconds=3600),
            ),
            metadata=api.auth(),
        )
        deadline = rotated.previous.expires_at.ToDatetime(tzinfo=UTC)
        assert before + timedelta(hours=1) <= deadline <= datetime.now(UTC) + timedelta(hours=1)
        resolved = await api.store.lookup_key(hash_key(old.secret))
        assert resolved is not None
        assert resolved[0].expires_at == deadline
        entries = await api.store.list_audit(api.workspace_id)
        rotate = next(e for e in entries if e.action == "key.rotate")
        assert rotate.detail == (
            f"replaced by {rotated.replacement.id}; valid until {deadline:%Y-%m-%dT%H:%M:%SZ}"
        )
        wanted = Change(ChangeKind.KEY, hash_key(old.secret).hex())
        async with asyncio.timeout(5):
            while wanted not in seen:
                await asyncio.sleep(0.02)
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)


@pytest.mark.parametrize("seconds", [0, -5, 31 * 24 * 3600])
async def test_grace_period_is_bounded(api: Api, seconds: int) -> None:
    old = await api.create("etl")
    error = await rpc_error(
        api.stub.RotateKey(
            keys_pb2.RotateKeyRequest(
                workspace_id=api.workspace_id,
                key_id=old.key.id,
                grace_period=Duration(seconds=seconds),
            ),
            metadata=api.auth(),
        )
    )
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_rotation_at_the_limit_goes_one_over_and_no_further(api: Api) -> None:
    keys = [await api.create(f"svc{i}") for i in range(3)]  # the limit is 3

    def rotate(key_id: str) -> Any:
        return api.stub.RotateKey(
            keys_pb2.RotateKeyRequest(workspace_id=api.workspace_id, key_id=key_id),
            metadata=api.auth(),
        )

    first = await rotate(keys[0].key.id)
    assert first.previous.active
    for call in (rotate(keys[1].key.id), rotate(first.replacement.id), api.create("more")):
        error = await rpc_error(call)
        assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert error.details() == LIMIT_MESSAGE
    # Revoking the replaced key (the last step of a rotation) makes room for the next one.
    await api.stub.RevokeKey(
        keys_pb2.RevokeKeyRequest(workspace_id=api.workspace_id, key_id=keys[0].key.id),
        metadata=api.auth(),
    )
    await rotate(keys[1].key.id)
    live = [k for k in await api.store.list_keys(api.workspace_id) if k.active]
    assert len(live) == 4


async def test_a_revoked_key_cannot_be_rotated(api: Api) -> None:
    old = await api.create("gone")
    await api.store.revoke_key(old.key.id, actor=CLI_ACTOR)
    error = await rpc_error(
        api.stub.RotateKey(
            keys_pb2.RotateKeyRequest(workspace_id=api.workspace_id, key_id=old.key.id),
            metadata=api.auth(),
        )
    )
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "no longer active" in (error.details() or "")


# Workspace and usage reads


async def test_workspace_limits_and_usage(api: Api) -> None:
    key = await api.create("reader")
    hour = datetime(2026, 11, 1, 10, tzinfo=UTC)
    await api.store.apply_usage_batch(
        "batch-1",
        [
            UsageRow(hour, api.workspace_id, key.key.id, "demo-model", 7, 100, 50, 1, 0, 0.25),
            UsageRow(hour, api.workspace_id, "key_other", "demo-model", 1, 1, 1, 0, 0, 0.0),
        ],
    )
    workspace = await api.stub.GetWorkspace(
        keys_pb2.GetWorkspaceRequest(workspace_id=api.workspace_id), metadata=api.auth()
    )
    assert (workspace.name, workspace.key_limit, workspace.active_keys) == ("acme", 3, 1)
    assert not workspace.HasField("monthly_token_quota")
    assert workspace.enforcement == "enforce"
    usage = await api.stub.GetUsage(
        keys_pb2.GetUsageRequest(workspace_id=api.workspace_id, key_id=key.key.id),
        metadata=api.auth(),
    )
    assert [MessageToDict(r, preserving_proto_field_name=True) for r in usage.rows] == [
        {
            "hour": "2026-11-01T10:00:00Z",
            "key_id": key.key.id,
            "model": "demo-model",
            "requests": "7",
            "prompt_tokens": "100",
            "completion_tokens": "50",
            "errors_4xx": "1",
            "spend_usd": 0.25,
        }
    ]


async def test_workspace_view_shows_shadow_enforcement(api: Api) -> None:
    update = WorkspaceUpdate(enforcement=Enforcement.SHADOW)
    await api.store.update_workspace(api.workspace_id, update, actor=CLI_ACTOR)
    workspace = await api.stub.GetWorkspace(
        keys_pb2.GetWorkspaceRequest(workspace_id=api.workspace_id), metadata=api.auth()
    )
    assert MessageToDict(workspace)["enforcement"] == "shadow"


async def test_unknown_workspace_is_not_found_for_a_member(api: Api) -> None:
    error = await rpc_error(
        api.stub.GetWorkspace(
            keys_pb2.GetWorkspaceRequest(workspace_id="ws_missing"),
            metadata=api.auth(workspaces=["ws_missing"]),
        )
    )
    assert error.code() is grpc.StatusCode.NOT_FOUND


# Pure helpers


def test_rotation_label_keeps_the_workload_and_dates_it() -> None:
    day = datetime(2026, 11, 27, tzinfo=UTC)
    assert rotation_label("payments", day) == "payments (rotated 2026-11-27)"
    assert rotation_label("payments (rotated 2026-01-02)", day) == "payments (rotated 2026-11-27)"
    long = rotation_label("x" * 128, day)
    assert len(long) == 128
    assert long.endswith(" (rotated 2026-11-27)")


def test_client_address_is_envoys_view_of_the_client() -> None:
    assert client_address({}, "ipv4:127.0.0.1:5000") == "127.0.0.1:5000"
    through_envoy = {
        "x-envoy-external-address": "198.51.100.4",
        "x-forwarded-for": "6.6.6.6, 192.0.2.2",  # the client's claims: never recorded
    }
    assert client_address(through_envoy, "ipv4:10.0.0.2:5000") == "198.51.100.4 via 10.0.0.2:5000"
    assert client_address({"x-forwarded-for": "6.6.6.6"}, "ipv4:10.0.0.2:5000") == "10.0.0.2:5000"
    assert client_address({}, "ipv6:[::1]:5000") == "[::1]:5000"
    forged = {"x-envoy-external-address": "1.2.3.4\nINCIDENT"}
    assert client_address(forged, "ipv4:10.0.0.2:5000") == "1.2.3.4\\x0aINCIDENT via 10.0.0.2:5000"


async def test_an_issuer_manages_only_the_workspaces_it_is_bound_to(
    store: Store, idp: TestIdp
) -> None:
    """Two tenants, two IdPs: tenant A's IdP admin mints a token naming tenant B's workspace."""
    tenant_a = await store.create_workspace(NewWorkspace(name="a"), actor=CLI_ACTOR)
    tenant_b = await store.create_workspace(NewWorkspace(name="b"), actor=CLI_ACTOR)
    with TestIdp(issuer="https://idp.tenant-b.example").serve() as idp_b:
        async with key_service(
            store, idp.config(workspaces=[tenant_a.id]), idp_b.config(workspaces=[tenant_b.id])
        ) as stub:
            greedy = idp.token(workspaces=[tenant_a.id, tenant_b.id])
            auth = (("authorization", f"Bearer {greedy}"),)
            for call in (
                stub.ListKeys(keys_pb2.ListKeysRequest(workspace_id=tenant_b.id), metadata=auth),
                stub.CreateKey(
                    keys_pb2.CreateKeyRequest(workspace_id=tenant_b.id, label="x"), metadata=auth
                ),
            ):
                error = await rpc_error(call)
                assert error.code() is grpc.StatusCode.PERMISSION_DENIED
                assert error.details() == (
                    f"your sign-in gives you no access to workspace {tenant_b.id}"
                )
            assert await store.list_keys(tenant_b.id) == []
            # The same token still manages A, and B's own IdP still manages B.
            await stub.ListKeys(keys_pb2.ListKeysRequest(workspace_id=tenant_a.id), metadata=auth)
            own = idp_b.token(workspaces=[tenant_b.id])
            await stub.ListKeys(
                keys_pb2.ListKeysRequest(workspace_id=tenant_b.id),
                metadata=(("authorization", f"Bearer {own}"),),
            )
