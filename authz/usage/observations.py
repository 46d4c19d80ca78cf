"""Latency buckets and denials per hour, from Envoy's access log, into their own tables.

Beside the ledger rather than in it: one line per access-log entry (`observe`), tallied in
memory and written once per Envoy batch with an idempotent batch id, like the ledger. Every
entry our Check decided counts: an allowed one by its duration (start to the last byte sent
downstream, the latency a client sees), a denied one by its reason when the denial names the
workspace (a 401 for an unknown or revoked key names none: nothing is known about it).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import grpc
from envoy.data.accesslog.v3.accesslog_pb2 import HTTPAccessLogEntry
from envoy.service.accesslog.v3.als_pb2 import StreamAccessLogsMessage, StreamAccessLogsResponse

from authz.store.base import Store, StoreUnavailable
from authz.usage.accesslog import AccessLogServicer, ReservationGate
from authz.usage.accountant import UsageAccountant
from authz.usage.events import EXT_AUTHZ_NAMESPACE
from authz.usage.latency import bucket_of
from authz.usage.observed import DenialRow, LatencyRow, denial_reason
from authz.usage.periods import hour_of

log = logging.getLogger(__name__)

_Slot = tuple[datetime, str, str, int | str]


def _text(entry: HTTPAccessLogEntry, name: str) -> str | None:
    fields = entry.common_properties.metadata.filter_metadata[EXT_AUTHZ_NAMESPACE].fields
    if name not in fields or fields[name].WhichOneof("kind") != "string_value":
        return None
    return fields[name].string_value[:128] or None


def observation(entry: HTTPAccessLogEntry) -> _Slot | None:
    """(hour, workspace, key, latency bucket or denial reason) of one entry, else None."""
    common = entry.common_properties
    if EXT_AUTHZ_NAMESPACE not in common.metadata.filter_metadata:
        return None  # not a request our Check saw (the console route, a health check)
    workspace_id = _text(entry, "workspace_id")
    if workspace_id is None:
        return None
    hour = hour_of(common.start_time.ToDatetime(tzinfo=UTC))
    key_id = _text(entry, "key_id") or ""
    decision = _text(entry, "decision")
    if decision == "allow":
        if not common.HasField("time_to_last_downstream_tx_byte"):
            return None  # the client went away before an answer: no latency to speak of
        duration = common.time_to_last_downstream_tx_byte
        return hour, workspace_id, key_id, bucket_of(duration.seconds + duration.nanos / 1e9)
    if decision == "deny":
        status = entry.response.response_code.value
        reason = denial_reason(status, _text(entry, "code"), _text(entry, "type"))
        return None if reason is None else (hour, workspace_id, key_id, reason)
    return None


class ObservationSink:
    """Tallies `observation`s per hour, workspace, key and bucket/reason until `flush`."""

    def __init__(self, *, store: Store) -> None:
        self._store = store
        self._pending: dict[_Slot, int] = {}
        self._unapplied: list[tuple[str, list[LatencyRow], list[DenialRow]]] = []
        # Streams from several Envoys flush concurrently: one at a time, or two could apply
        # the same batch and then drop the next one unapplied.
        self._flush_lock = asyncio.Lock()

    def observe(self, entry: HTTPAccessLogEntry) -> None:
        slot = observation(entry)
        if slot is not None:
            self._pending[slot] = self._pending.get(slot, 0) + 1

    async def flush(self) -> None:
        """Write what was tallied; a batch that failed is retried first, under its own id."""
        async with self._flush_lock:
            if self._pending:
                latency: list[LatencyRow] = []
                denials: list[DenialRow] = []
                for (hour, workspace_id, key_id, what), n in self._pending.items():
                    if isinstance(what, int):
                        latency.append(LatencyRow(hour, workspace_id, key_id, what, n))
                    else:
                        denials.append(DenialRow(hour, workspace_id, key_id, what, n))
                self._pending = {}
                self._unapplied.append((uuid.uuid4().hex, latency, denials))
            while self._unapplied:
                batch_id, latency, denials = self._unapplied[0]
                try:
                    await self._store.apply_observation_batch(batch_id, latency, denials)
                except StoreUnavailable as error:
                    log.warning(
                        "observations: flush failed, retried with the next batch: %s", error
                    )
                    return
                self._unapplied.pop(0)


class ObservedAccessLog(AccessLogServicer):
    """The access-log service, with every entry also handed to an ObservationSink."""

    def __init__(
        self, accountant: UsageAccountant, *, gate: ReservationGate, sink: ObservationSink
    ) -> None:
        super().__init__(accountant, gate=gate)
        self._sink = sink

    async def _observed(
        self, messages: AsyncIterator[StreamAccessLogsMessage]
    ) -> AsyncIterator[StreamAccessLogsMessage]:
        async for message in messages:
            for entry in message.http_logs.log_entry:
                self._sink.observe(entry)
            yield message
            # Back here once accounting took the batch: one write per Envoy batch, like it.
            await self._sink.flush()

    async def StreamAccessLogs(
        self,
        request_iterator: AsyncIterator[StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext[StreamAccessLogsMessage, StreamAccessLogsResponse],
    ) -> StreamAccessLogsResponse:
        return await super().StreamAccessLogs(self._observed(request_iterator), context)
