"""tokenfactory.console.v1.ConsoleService: the console's reads beyond KeyService.

Served by `authz serve` next to KeyService, with the same sign-in (authz/identity.py's
verifier) and the same rule: the caller must be allowed to manage keys in the workspace it
names. Typed failures become gRPC status codes here, once.
"""

from __future__ import annotations

from typing import Any

import grpc

from authz.api.gen import console_pb2, console_pb2_grpc
from authz.api.messages import timestamp
from authz.identity import Forbidden, IdentityVerifier, SignInUnavailable, Unauthenticated
from authz.models import AuditEntry
from authz.store.base import Store, StoreUnavailable

Context = grpc.aio.ServicerContext[Any, Any]

DEFAULT_AUDIT_ENTRIES = 100
MAX_AUDIT_ENTRIES = 1000

_STATUS: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (Forbidden, grpc.StatusCode.PERMISSION_DENIED),
    (SignInUnavailable, grpc.StatusCode.UNAVAILABLE),
    (StoreUnavailable, grpc.StatusCode.UNAVAILABLE),
)


def audit_message(entry: AuditEntry) -> console_pb2.AuditEntry:
    """An audit line as members see it: without the caller's network address."""
    return console_pb2.AuditEntry(
        at=timestamp(entry.at),
        key_id=entry.key_id or "",
        action=entry.action,
        actor_kind=entry.actor_kind,
        actor_subject=entry.actor_subject,
        actor_issuer=entry.actor_issuer or "",
        detail=entry.detail,
    )


class ConsoleServicer(console_pb2_grpc.ConsoleServiceServicer):  # type: ignore[misc]
    """The ConsoleService RPCs; one per process, built by the composition root."""

    def __init__(self, *, store: Store, verifier: IdentityVerifier) -> None:
        self._store = store
        self._verifier = verifier

    async def ListAudit(
        self, request: console_pb2.ListAuditRequest, context: Context
    ) -> console_pb2.ListAuditResponse:
        if request.limit < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "limit must not be negative")
        try:
            authorization = next(
                (v for k, v in context.invocation_metadata() or () if k.lower() == "authorization"),
                None,
            )
            identity = await self._verifier.verify(
                authorization if isinstance(authorization, str) else None
            )
            identity.require_manager(request.workspace_id)
            entries = await self._store.list_audit(request.workspace_id)
        except tuple(kind for kind, _ in _STATUS) as error:
            code = next(code for kind, code in _STATUS if isinstance(error, kind))
            await context.abort(code, str(error))
        limit = min(request.limit or DEFAULT_AUDIT_ENTRIES, MAX_AUDIT_ENTRIES)
        newest = entries[::-1][:limit]  # the store lists in insertion order
        return console_pb2.ListAuditResponse(entries=[audit_message(e) for e in newest])
