"""tokenfactory.console.v1.ConsoleService: the console's reads beyond KeyService.

Served by `authz serve` next to KeyService, with the same sign-in (authz/identity.py's
verifier) and the same rule: the caller must be allowed to manage keys in the workspace it
names. Typed failures become gRPC status codes here, once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc

from authz.api.gen import console_pb2, console_pb2_grpc
from authz.api.messages import timestamp
from authz.identity import Forbidden, IdentityVerifier, SignInUnavailable, Unauthenticated
from authz.models import AuditEntry
from authz.store.base import Store, StoreUnavailable
from authz.usage.latency import merge, percentile
from authz.usage.observed import DenialRow, LatencyRow
from authz.usage.periods import hour_of

Context = grpc.aio.ServicerContext[Any, Any]

DEFAULT_AUDIT_ENTRIES = 100
MAX_AUDIT_ENTRIES = 1000
MAX_OBSERVATION_SPAN = timedelta(days=32)

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


def latency_message(histograms: Iterable[Mapping[int, int]]) -> console_pb2.Latency:
    counts = merge(histograms)
    return console_pb2.Latency(
        requests=sum(counts.values()),
        p50_ms=round(percentile(counts, 0.5) or 0.0, 3),
        p95_ms=round(percentile(counts, 0.95) or 0.0, 3),
    )


def observations_message(
    latency: Iterable[LatencyRow], denials: Iterable[DenialRow]
) -> console_pb2.GetObservationsResponse:
    """Store rows → percentiles and denial counts per hour, per key and for the whole range."""
    by_hour: dict[datetime, list[dict[int, int]]] = {}
    by_key: dict[str, list[dict[int, int]]] = {}
    everything: list[dict[int, int]] = []
    for row in latency:
        histogram = {row.bucket: row.count}
        by_hour.setdefault(row.hour, []).append(histogram)
        by_key.setdefault(row.key_id, []).append(histogram)
        everything.append(histogram)
    hour_denials: dict[datetime, dict[str, int]] = {}
    key_denials: dict[str, dict[str, int]] = {}
    for denial in denials:
        for reasons in (
            hour_denials.setdefault(denial.hour, {}),
            key_denials.setdefault(denial.key_id, {}),
        ):
            reasons[denial.reason] = reasons.get(denial.reason, 0) + denial.count
    hours = sorted({*by_hour, *hour_denials})
    keys = sorted({*by_key, *key_denials})
    return console_pb2.GetObservationsResponse(
        hours=[
            console_pb2.HourObservation(
                hour=timestamp(hour),
                latency=latency_message(by_hour.get(hour, ())),
                denials=hour_denials.get(hour, {}),
            )
            for hour in hours
        ],
        keys=[
            console_pb2.KeyObservation(
                key_id=key_id,
                latency=latency_message(by_key.get(key_id, ())),
                denials=key_denials.get(key_id, {}),
            )
            for key_id in keys
        ],
        total=latency_message(everything),
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
            await self._require_manager(request.workspace_id, context)
            entries = await self._store.list_audit(request.workspace_id)
        except tuple(kind for kind, _ in _STATUS) as error:
            await self._abort(error, context)
        limit = min(request.limit or DEFAULT_AUDIT_ENTRIES, MAX_AUDIT_ENTRIES)
        newest = entries[::-1][:limit]  # the store lists in insertion order
        return console_pb2.ListAuditResponse(entries=[audit_message(e) for e in newest])

    async def GetObservations(
        self, request: console_pb2.GetObservationsRequest, context: Context
    ) -> console_pb2.GetObservationsResponse:
        if not (request.HasField("since") and request.HasField("until")):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "since and until are required")
        since = hour_of(request.since.ToDatetime(tzinfo=UTC))
        until = hour_of(request.until.ToDatetime(tzinfo=UTC))
        if not since < until <= since + MAX_OBSERVATION_SPAN:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "until must be after since, by at most 32 days (whole hours)",
            )
        try:
            await self._require_manager(request.workspace_id, context)
            latency = await self._store.latency_report(request.workspace_id, since, until)
            denials = await self._store.denial_report(request.workspace_id, since, until)
        except tuple(kind for kind, _ in _STATUS) as error:
            await self._abort(error, context)
        return observations_message(latency, denials)

    async def _require_manager(self, workspace_id: str, context: Context) -> None:
        authorization = next(
            (v for k, v in context.invocation_metadata() or () if k.lower() == "authorization"),
            None,
        )
        identity = await self._verifier.verify(
            authorization if isinstance(authorization, str) else None
        )
        identity.require_manager(workspace_id)

    @staticmethod
    async def _abort(error: Exception, context: Context) -> None:
        code = next(code for kind, code in _STATUS if isinstance(error, kind))
        await context.abort(code, str(error))
