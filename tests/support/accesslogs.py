"""Access-log entries as Envoy's `http_grpc` logger sends them, built from a Check's answer."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import grpc
from envoy.data.accesslog.v3.accesslog_pb2 import HTTPAccessLogEntry
from envoy.service.accesslog.v3.als_pb2 import StreamAccessLogsMessage
from envoy.service.accesslog.v3.als_pb2_grpc import AccessLogServiceStub
from envoy.service.auth.v3.external_auth_pb2 import CheckResponse
from google.protobuf.struct_pb2 import Struct

AUTHZ = "envoy.filters.http.ext_authz"


def log_entry(
    authz: Struct | Mapping[str, Any],
    usage: Mapping[str, Any] | None,
    *,
    started: datetime,
    status: int = 200,
) -> HTTPAccessLogEntry:
    """One entry carrying `authz` as the ext_authz metadata and `usage` as `oais.usage`."""
    entry = HTTPAccessLogEntry()
    entry.common_properties.start_time.FromDatetime(started)
    entry.response.response_code.value = status
    fields = entry.common_properties.metadata.filter_metadata
    if isinstance(authz, Struct):
        fields[AUTHZ].CopyFrom(authz)
    else:
        fields[AUTHZ].update(dict(authz))
    if usage is not None:
        fields["oais.usage"].update(dict(usage))
    return entry


def from_check(
    response: CheckResponse, usage: Mapping[str, Any] | None, *, started: datetime
) -> HTTPAccessLogEntry:
    """The entry Envoy would log for a request our Check answered with `response`."""
    return log_entry(response.dynamic_metadata, usage, started=started)


async def send(address: str, *batches: Iterable[HTTPAccessLogEntry]) -> None:
    """Stream `batches` (one message each) to the access-log service at `address`, as anyone
    who can reach the gRPC port could."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = AccessLogServiceStub(channel)
        messages = []
        for batch in batches:
            message = StreamAccessLogsMessage()
            message.identifier.log_name = "authz_usage"
            message.http_logs.log_entry.extend(batch)
            messages.append(message)
        await stub.StreamAccessLogs(iter(messages), timeout=10)
