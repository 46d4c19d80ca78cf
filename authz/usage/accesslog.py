"""`envoy.service.accesslog.v3.AccessLogService`: Envoy streams its access logs to us here.

An entry reaches accounting only through the `ReservationGate`: signed by our Check, fresh, and
reported for the first time. Anything else is dropped, counted by reason, and warned about (ids
only, at most once per reason every few seconds, so a flood cannot flood the logs too).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

import grpc
from envoy.service.accesslog.v3 import als_pb2_grpc
from envoy.service.accesslog.v3.als_pb2 import StreamAccessLogsMessage, StreamAccessLogsResponse

from authz.metrics import Metrics
from authz.store.base import StoreUnavailable
from authz.usage.accountant import UsageAccountant
from authz.usage.events import UsageEvent, parse_entry
from authz.usage.replay import ReplayCheckUnavailable, ReplayGuard
from authz.usage.reservations import CLOCK_SKEW_S, MAX_AGE_S, REPLAY_TTL_S, Keyring

log = logging.getLogger(__name__)

WARN_EVERY_S = 10.0


class ReservationGate:
    """Decides whether an entry may change anyone's usage (docs/deploy.md, "Who can reach the
    gRPC port")."""

    def __init__(
        self,
        *,
        keyring: Keyring,
        replay: ReplayGuard,
        metrics: Metrics,
        clock: Callable[[], float],
    ) -> None:
        self._keyring = keyring
        self._replay = replay
        self._metrics = metrics
        self._clock = clock
        self._last_warning: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    async def admit(self, event: UsageEvent) -> bool:
        reason = await self._refusal(event)
        if reason is None:
            return True
        self._metrics.entries_refused.labels(reason).inc()
        self._warn(reason, event)
        return False

    async def _refusal(self, event: UsageEvent) -> str | None:
        claims = event.claims
        if claims is None or not event.mac:
            return "unsigned"
        if not await self._keyring.verify(claims, key_id=event.signing_key, mac=event.mac):
            return "bad_mac"
        age = self._clock() - claims.reserved_at
        if age > MAX_AGE_S or age < -CLOCK_SKEW_S:
            return "too_old"
        try:
            first = await self._replay.first_report(
                claims.workspace_id, claims.reservation_id, ttl_s=REPLAY_TTL_S
            )
        except ReplayCheckUnavailable as error:
            # Signed and fresh: counting it risks a replay only while Redis is down, dropping
            # it loses a genuine report for sure.
            self._metrics.replay_unchecked.inc()
            log.warning(
                "usage: reservation %s counted without the replay check: %s",
                claims.reservation_id,
                error,
            )
            return None
        return None if first else "replay"

    def _warn(self, reason: str, event: UsageEvent) -> None:
        now = self._clock()
        if now - self._last_warning.get(reason, float("-inf")) < WARN_EVERY_S:
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
            return
        self._last_warning[reason] = now
        more = self._suppressed.pop(reason, 0)
        rid = event.claims.reservation_id if event.claims else None
        log.warning(
            "usage: access-log entry refused (%s): reservation %r, workspace %r, key %r "
            "(%d more refused for this reason since the last warning)",
            reason,
            rid,
            event.workspace_id,
            event.key_id,
            more,
        )


class AccessLogServicer(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    """Receives Envoy's `http_grpc` access-log stream and hands each entry to accounting."""

    def __init__(self, accountant: UsageAccountant, *, gate: ReservationGate) -> None:
        self._accountant = accountant
        self._gate = gate

    async def StreamAccessLogs(
        self,
        request_iterator: AsyncIterator[StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext[StreamAccessLogsMessage, StreamAccessLogsResponse],
    ) -> StreamAccessLogsResponse:
        async for message in request_iterator:
            recorded = 0
            for entry in message.http_logs.log_entry:
                event = parse_entry(entry)
                if event is None or not await self._gate.admit(event):
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
