"""`envoy.service.accesslog.v3.AccessLogService`: Envoy streams its access logs to us here."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
from envoy.service.accesslog.v3 import als_pb2_grpc
from envoy.service.accesslog.v3.als_pb2 import StreamAccessLogsMessage, StreamAccessLogsResponse

from authz.store.base import StoreUnavailable
from authz.usage.accountant import UsageAccountant
from authz.usage.events import parse_entry

log = logging.getLogger(__name__)


class AccessLogServicer(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    """Receives Envoy's `http_grpc` access-log stream and hands each entry to accounting."""

    def __init__(self, accountant: UsageAccountant) -> None:
        self._accountant = accountant

    async def StreamAccessLogs(
        self,
        request_iterator: AsyncIterator[StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext[StreamAccessLogsMessage, StreamAccessLogsResponse],
    ) -> StreamAccessLogsResponse:
        async for message in request_iterator:
            recorded = 0
            for entry in message.http_logs.log_entry:
                event = parse_entry(entry)
                if event is None:
                    continue
                try:
                    await self._accountant.record(event)
                    recorded += 1
                except StoreUnavailable as error:
                    # Only the workspace lookup can fail here; keep the stream alive.
                    log.warning("usage: entry for %s not reconciled: %s", event.workspace_id, error)
            if recorded:
                # Envoy batches entries (buffer_flush_interval), so one ledger write per batch
                # is cheap, and a hard kill loses at most the batch in hand. The accountant's
                # timer only retries what a failed write left behind.
                await self._accountant.flush()
        return StreamAccessLogsResponse()
