"""tokenfactory.keys.v1.KeyService: key management for signed-in workspace members.

Every call is signed in with a JWT (authz/identity.py) and checked against the workspace it
names, before anything is read. The store does the work and keeps its promises (the key limit
is atomic, revocations and grace deadlines reach every replica); this module only checks who
may do what, audits who did it from where, and translates typed failures into gRPC status
codes, once, here at the edge. Envoy's JSON transcoder maps those codes to HTTP statuses.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import grpc

from authz.api.body import apply_json_body
from authz.api.gen import keys_pb2, keys_pb2_grpc
from authz.api.messages import is_live, key_message, usage_message, workspace_message
from authz.identity import Forbidden, IdentityVerifier, SignInUnavailable, Unauthenticated
from authz.keys import mint_key
from authz.models import Actor, ApiKey
from authz.rotation import grace_deadline, rotate_key
from authz.store.base import (
    Conflict,
    KeyLimitReached,
    NotFound,
    Store,
    StoreUnavailable,
    utc_now,
)
from authz.store.common import InvalidInput
from authz.textsafe import printable

log = logging.getLogger(__name__)

T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]

# Which typed failure becomes which status. The key limit is FAILED_PRECONDITION (HTTP 400),
# not RESOURCE_EXHAUSTED (429): waiting does not help, revoking a key does.
_STATUS: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (Forbidden, grpc.StatusCode.PERMISSION_DENIED),
    (SignInUnavailable, grpc.StatusCode.UNAVAILABLE),
    (StoreUnavailable, grpc.StatusCode.UNAVAILABLE),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (KeyLimitReached, grpc.StatusCode.FAILED_PRECONDITION),
    (Conflict, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
)
_HANDLED = tuple(kind for kind, _ in _STATUS)


def client_address(metadata: Mapping[str, str], peer: str) -> str:
    """Where a call came from, for the audit log: Envoy's view of the client.

    Through Envoy (use_remote_address on the public listener) that is `x-envoy-external-address`:
    the source address of the client's connection, which Envoy sets itself and never takes from
    the client. The client's own x-forwarded-for claims are ignored. The gRPC peer (Envoy) is
    kept next to it, so a forwarded address is never recorded without the hop that vouched for
    it; a direct gRPC caller is recorded by its peer address alone.
    """
    kind, _, address = peer.partition(":")
    direct = address if kind in {"ipv4", "ipv6"} else peer
    client = printable(metadata.get("x-envoy-external-address", "").strip())[:64]
    return f"{client} via {direct}" if client else direct


def _metadata(context: Context) -> dict[str, str]:
    found: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, str):
            found.setdefault(key.lower(), value)
    return found


def _grace(request: keys_pb2.RotateKeyRequest) -> timedelta | None:
    return request.grace_period.ToTimedelta() if request.HasField("grace_period") else None


class KeyServicer(keys_pb2_grpc.KeyServiceServicer):  # type: ignore[misc]
    """The KeyService RPCs; one per process, built by the composition root."""

    def __init__(
        self,
        *,
        store: Store,
        verifier: IdentityVerifier,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._store = store
        self._verifier = verifier
        self._clock = clock

    # RPCs

    async def CreateKey(
        self, request: keys_pb2.CreateKeyRequest, context: Context
    ) -> keys_pb2.CreateKeyResponse:
        return await self._answer(context, "CreateKey", lambda: self._create(request, context))

    async def ListKeys(
        self, request: keys_pb2.ListKeysRequest, context: Context
    ) -> keys_pb2.ListKeysResponse:
        return await self._answer(context, "ListKeys", lambda: self._list(request, context))

    async def GetKey(self, request: keys_pb2.GetKeyRequest, context: Context) -> keys_pb2.Key:
        return await self._answer(context, "GetKey", lambda: self._get(request, context))

    async def RevokeKey(self, request: keys_pb2.RevokeKeyRequest, context: Context) -> keys_pb2.Key:
        return await self._answer(context, "RevokeKey", lambda: self._revoke(request, context))

    async def RotateKey(
        self, request: keys_pb2.RotateKeyRequest, context: Context
    ) -> keys_pb2.RotateKeyResponse:
        return await self._answer(context, "RotateKey", lambda: self._rotate(request, context))

    async def GetWorkspace(
        self, request: keys_pb2.GetWorkspaceRequest, context: Context
    ) -> keys_pb2.Workspace:
        return await self._answer(
            context, "GetWorkspace", lambda: self._workspace(request, context)
        )

    async def GetUsage(
        self, request: keys_pb2.GetUsageRequest, context: Context
    ) -> keys_pb2.GetUsageResponse:
        return await self._answer(context, "GetUsage", lambda: self._usage(request, context))

    # The edge: typed failures become status codes here and nowhere else.

    async def _answer(self, context: Context, method: str, work: Callable[[], Awaitable[T]]) -> T:
        try:
            answer = await work()
        except _HANDLED as error:
            code = next(code for kind, code in _STATUS if isinstance(error, kind))
            log.info("key api: %s answered %s: %s", method, code.name, error)
            unauthenticated = code is grpc.StatusCode.UNAUTHENTICATED
            trailers = (("www-authenticate", "Bearer"),) if unauthenticated else ()
            await context.abort(code, str(error), trailing_metadata=trailers)
        return answer

    async def _caller(self, context: Context, workspace_id: str) -> Actor:
        """The signed-in caller, allowed to manage keys in `workspace_id`, as an audit actor."""
        metadata = _metadata(context)
        identity = await self._verifier.verify(metadata.get("authorization"))
        if not workspace_id:
            raise InvalidInput("workspace_id is required")
        identity.require_manager(workspace_id)
        return Actor(
            kind="user",
            subject=identity.subject,
            issuer=identity.issuer,
            address=client_address(metadata, context.peer()),
        )

    async def _own_key(self, workspace_id: str, key_id: str) -> ApiKey:
        """The key, if it belongs to the workspace; other workspaces' keys do not exist here."""
        key = await self._store.get_key(key_id) if key_id else None
        if key is None or key.workspace_id != workspace_id:
            raise NotFound(f"no key {key_id} in workspace {workspace_id}")
        return key

    # The work, once the caller is known.

    async def _create(
        self, request: keys_pb2.CreateKeyRequest, context: Context
    ) -> keys_pb2.CreateKeyResponse:
        actor = await self._caller(context, request.workspace_id)
        request = apply_json_body(request)
        secret, new = mint_key(request.workspace_id, request.label)
        created = await self._store.create_key(new, actor=actor)
        log.info("key api: %s created %s in %s", actor.subject, created.id, created.workspace_id)
        return keys_pb2.CreateKeyResponse(
            key=key_message(created, now=self._clock()), secret=secret
        )

    async def _list(
        self, request: keys_pb2.ListKeysRequest, context: Context
    ) -> keys_pb2.ListKeysResponse:
        await self._caller(context, request.workspace_id)
        if await self._store.get_workspace(request.workspace_id) is None:
            raise NotFound(f"no workspace {request.workspace_id}")
        now = self._clock()
        keys = await self._store.list_keys(request.workspace_id)
        return keys_pb2.ListKeysResponse(keys=[key_message(k, now=now) for k in keys])

    async def _get(self, request: keys_pb2.GetKeyRequest, context: Context) -> keys_pb2.Key:
        await self._caller(context, request.workspace_id)
        key = await self._own_key(request.workspace_id, request.key_id)
        return key_message(key, now=self._clock())

    async def _revoke(self, request: keys_pb2.RevokeKeyRequest, context: Context) -> keys_pb2.Key:
        actor = await self._caller(context, request.workspace_id)
        request = apply_json_body(request)
        await self._own_key(request.workspace_id, request.key_id)
        reason = "leaked" if request.leaked else "revoked"
        revoked = await self._store.revoke_key(request.key_id, actor=actor, reason=reason)
        log.info("key api: %s revoked %s (%s)", actor.subject, revoked.id, reason)
        return key_message(revoked, now=self._clock())

    async def _rotate(
        self, request: keys_pb2.RotateKeyRequest, context: Context
    ) -> keys_pb2.RotateKeyResponse:
        actor = await self._caller(context, request.workspace_id)
        request = apply_json_body(request)
        old = await self._own_key(request.workspace_id, request.key_id)
        now = self._clock()
        rotation = await rotate_key(
            self._store,
            old,
            label=request.label or None,
            deadline=grace_deadline(_grace(request), now, name="grace_period"),
            actor=actor,
            now=now,
        )
        previous, replacement = rotation.previous, rotation.replacement
        log.info("key api: %s rotated %s to %s", actor.subject, previous.id, replacement.id)
        return keys_pb2.RotateKeyResponse(
            replacement=key_message(replacement, now=now),
            secret=rotation.secret,
            previous=key_message(previous, now=now),
        )

    async def _workspace(
        self, request: keys_pb2.GetWorkspaceRequest, context: Context
    ) -> keys_pb2.Workspace:
        await self._caller(context, request.workspace_id)
        workspace = await self._store.get_workspace(request.workspace_id)
        if workspace is None:
            raise NotFound(f"no workspace {request.workspace_id}")
        now = self._clock()
        live = sum(is_live(k, now) for k in await self._store.list_keys(workspace.id))
        return workspace_message(workspace, active_keys=live)

    async def _usage(
        self, request: keys_pb2.GetUsageRequest, context: Context
    ) -> keys_pb2.GetUsageResponse:
        await self._caller(context, request.workspace_id)
        if request.key_id:
            await self._own_key(request.workspace_id, request.key_id)
        elif await self._store.get_workspace(request.workspace_id) is None:
            raise NotFound(f"no workspace {request.workspace_id}")
        rows = await self._store.usage_report(
            workspace_id=request.workspace_id,
            key_id=request.key_id or None,
            since=request.since.ToDatetime(tzinfo=UTC) if request.HasField("since") else None,
            until=request.until.ToDatetime(tzinfo=UTC) if request.HasField("until") else None,
        )
        return keys_pb2.GetUsageResponse(rows=[usage_message(row) for row in rows])
