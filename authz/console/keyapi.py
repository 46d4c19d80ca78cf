"""The public key management API (tokenfactory.keys.v1.KeyService), as the console calls it.

Every call carries the member's JWT, so the key API enforces every rule (signature,
permission, workspace isolation) itself; the console only relays. gRPC failures become one
typed error with the HTTP status the page shows, translated here and nowhere else.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from authz.api.gen import console_pb2, console_pb2_grpc, keys_pb2, keys_pb2_grpc
from authz.api.messages import timestamp

_HTTP_STATUS = {
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
}


class KeyApiError(Exception):
    """The key API refused or failed; `status` is the HTTP status the console answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def as_json(message: Message) -> dict[str, Any]:
    return MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


_CONSOLE_METHODS = frozenset({"ListAudit", "GetObservations"})


class KeyApi:
    """KeyService and ConsoleService clients over one channel; `token` is the member's JWT."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout_s: float) -> None:
        self._stub = keys_pb2_grpc.KeyServiceStub(channel)
        self._console = console_pb2_grpc.ConsoleServiceStub(channel)
        self._timeout = timeout_s

    async def _call(self, method: str, request: Message, token: str, client: str) -> Any:
        stub = self._console if method in _CONSOLE_METHODS else self._stub
        metadata = [("authorization", f"Bearer {token}")]
        if client:
            metadata.append(("x-forwarded-for", client))
        try:
            return await getattr(stub, method)(request, metadata=metadata, timeout=self._timeout)
        except grpc.aio.AioRpcError as error:
            status = _HTTP_STATUS.get(error.code(), 503)
            raise KeyApiError(status, error.details() or error.code().name) from None

    async def list_keys(self, token: str, client: str, workspace_id: str) -> list[dict[str, Any]]:
        answer = await self._call(
            "ListKeys", keys_pb2.ListKeysRequest(workspace_id=workspace_id), token, client
        )
        return [as_json(key) for key in answer.keys]

    async def workspace(self, token: str, client: str, workspace_id: str) -> dict[str, Any]:
        answer = await self._call(
            "GetWorkspace", keys_pb2.GetWorkspaceRequest(workspace_id=workspace_id), token, client
        )
        return as_json(answer)

    async def create_key(
        self, token: str, client: str, workspace_id: str, label: str
    ) -> dict[str, Any]:
        request = keys_pb2.CreateKeyRequest(workspace_id=workspace_id, label=label)
        return as_json(await self._call("CreateKey", request, token, client))

    async def revoke_key(
        self, token: str, client: str, workspace_id: str, key_id: str, *, leaked: bool
    ) -> dict[str, Any]:
        request = keys_pb2.RevokeKeyRequest(workspace_id=workspace_id, key_id=key_id, leaked=leaked)
        return as_json(await self._call("RevokeKey", request, token, client))

    async def rotate_key(
        self,
        token: str,
        client: str,
        workspace_id: str,
        key_id: str,
        *,
        grace_s: int | None,
    ) -> dict[str, Any]:
        request = keys_pb2.RotateKeyRequest(workspace_id=workspace_id, key_id=key_id)
        if grace_s is not None:
            request.grace_period.CopyFrom(Duration(seconds=grace_s))
        return as_json(await self._call("RotateKey", request, token, client))

    async def usage(
        self, token: str, client: str, workspace_id: str, *, since: datetime, until: datetime
    ) -> list[keys_pb2.UsageRow]:
        request = keys_pb2.GetUsageRequest(
            workspace_id=workspace_id, since=timestamp(since), until=timestamp(until)
        )
        answer = await self._call("GetUsage", request, token, client)
        return list(answer.rows)

    async def audit(self, token: str, client: str, workspace_id: str) -> list[dict[str, Any]]:
        request = console_pb2.ListAuditRequest(workspace_id=workspace_id, limit=200)
        answer = await self._call("ListAudit", request, token, client)
        return [as_json(entry) for entry in answer.entries]

    async def observations(
        self, token: str, client: str, workspace_id: str, *, since: datetime, until: datetime
    ) -> console_pb2.GetObservationsResponse:
        request = console_pb2.GetObservationsRequest(
            workspace_id=workspace_id, since=timestamp(since), until=timestamp(until)
        )
        answer: console_pb2.GetObservationsResponse = await self._call(
            "GetObservations", request, token, client
        )
        return answer
