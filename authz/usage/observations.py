"""Latency buckets and denials per hour, into their own tables beside the ledger.

Tallied in memory and written with the ledger's paced writes (authz/usage/pacing.py), with an
idempotent batch id like it. Only what our Check vouches for counts: an allowed request by its
duration (start to the last byte sent downstream, the latency a client sees) once its signed
entry is admitted, a denial by its reason as Check answers it, when it names the workspace (a
401 for an unknown or revoked key names none: nothing is known about it). An entry from
whoever else reaches the gRPC port adds nothing to anyone's page.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from envoy.data.accesslog.v3.accesslog_pb2 import HTTPAccessLogEntry

from authz.decision import Deny
from authz.store.base import Store, StoreUnavailable
from authz.usage.accesslog import AccessLogServicer, ReservationGate
from authz.usage.accountant import UsageAccountant
from authz.usage.events import EXT_AUTHZ_NAMESPACE, UsageEvent, parse_entry
from authz.usage.latency import bucket_of
from authz.usage.observed import DenialRow, LatencyRow, denial_reason
from authz.usage.periods import HourSlots, hour_of

log = logging.getLogger(__name__)

_Slot = tuple[datetime, str, str, int | str]


def _text(entry: HTTPAccessLogEntry, name: str) -> str | None:
    fields = entry.common_properties.metadata.filter_metadata[EXT_AUTHZ_NAMESPACE].fields
    if name not in fields or fields[name].WhichOneof("kind") != "string_value":
        return None
    return fields[name].string_value[:128] or None


def latency_slot(event: UsageEvent, hour: datetime) -> _Slot | None:
    """An allowed request's latency bucket (start to the last byte sent downstream, the latency
    a client sees), else None: the client went away before an answer."""
    if event.latency_seconds is None:
        return None
    return hour, event.workspace_id, event.key_id, bucket_of(event.latency_seconds)


def denial_slot(entry: HTTPAccessLogEntry) -> _Slot | None:
    """A denial's reason, when it names the workspace, else None."""
    common = entry.common_properties
    if EXT_AUTHZ_NAMESPACE not in common.metadata.filter_metadata:
        return None  # not a request our Check saw (the console route, a health check)
    if _text(entry, "decision") != "deny":
        return None
    workspace_id = _text(entry, "workspace_id")
    if workspace_id is None:
        return None
    status = entry.response.response_code.value
    reason = denial_reason(status, _text(entry, "code"), _text(entry, "type"))
    if reason is None:
        return None
    return hour_of(common.start_time.ToDatetime(tzinfo=UTC)), workspace_id, _key(entry), reason


def _key(entry: HTTPAccessLogEntry) -> str:
    return _text(entry, "key_id") or ""


def observation(entry: HTTPAccessLogEntry) -> _Slot | None:
    """(hour, workspace, key, latency bucket or denial reason) of one entry, else None."""
    event = parse_entry(entry)
    if event is None:
        return denial_slot(entry)
    return latency_slot(event, hour_of(event.started_at))


class ObservationSink:
    """Tallies `observation`s per hour, workspace, key and bucket/reason until `flush`."""

    def __init__(self, *, store: Store, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock
        self._hours = HourSlots()
        self._pending: dict[_Slot, int] = {}
        self._unapplied: list[tuple[str, list[LatencyRow], list[DenialRow]]] = []
        # Streams from several Envoys flush concurrently: one at a time, or two could apply
        # the same batch and then drop the next one unapplied.
        self._flush_lock = asyncio.Lock()

    def observe(self, entry: HTTPAccessLogEntry) -> None:
        self.add(observation(entry))

    def add(self, slot: _Slot | None) -> None:
        if slot is not None:
            self._pending[slot] = self._pending.get(slot, 0) + 1

    def denied(self, deny: Deny) -> None:
        """One of our Check's denials, counted as Check answers it: a denial's access-log entry
        carries nothing signed, so anyone who reaches the gRPC port could forge one."""
        if deny.workspace_id is None:
            return  # an unknown or revoked key's 401: nothing is known about it
        reason = denial_reason(deny.status, deny.code, deny.type)
        if reason is not None:
            hour = self._hours.of(datetime.fromtimestamp(self._clock(), UTC))[0]
            self.add((hour, deny.workspace_id, deny.key_id or "", reason))

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
    """The access-log service, with the latency of the entries accounting admitted tallied too
    (signed by our Check: a forged entry adds nothing to anyone's page), and the sink's
    denials written with them."""

    def __init__(
        self, accountant: UsageAccountant, *, gate: ReservationGate, sink: ObservationSink
    ) -> None:
        super().__init__(accountant, gate=gate)
        self._sink = sink
        self._hours = HourSlots()

    def observe(self, admitted: list[UsageEvent]) -> None:
        # Denials are told by Check itself (`ObservationSink.denied`), never by an entry.
        sink, hours = self._sink, self._hours
        for event in admitted:
            sink.add(latency_slot(event, hours.of(event.started_at)[0]))

    async def write(self) -> None:
        """The ledger's write, then the observations' (paced alike)."""
        await super().write()
        await self._sink.flush()
