"""`envoy.service.accesslog.v3.AccessLogService`: Envoy streams its access logs to us here.

An entry reaches accounting only through the `ReservationGate`: signed by our Check, fresh, and
reported for the first time. Anything else is dropped, counted by reason, and warned about (ids
only, at most once per reason every few seconds, so a flood cannot flood the logs too).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence

import grpc
from envoy.data.accesslog.v3.accesslog_pb2 import HTTPAccessLogEntry
from envoy.service.accesslog.v3 import als_pb2_grpc
from envoy.service.accesslog.v3.als_pb2 import StreamAccessLogsMessage, StreamAccessLogsResponse

from authz.metrics import Metrics
from authz.store.base import StoreUnavailable
from authz.usage.accountant import UsageAccountant
from authz.usage.events import UsageEvent, parse_entry
from authz.usage.pacing import WRITE_EVERY_S, PacedWrites
from authz.usage.replay import ReplayCheckUnavailable, ReplayGuard
from authz.usage.reservations import CLOCK_SKEW_S, MAX_AGE_S, REPLAY_TTL_S, Claims, Keyring

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

    async def admit(self, events: Sequence[UsageEvent]) -> list[UsageEvent]:
        """The events that may change usage, in order; the others are counted and warned about.
        The replay check asks once for all of them (one round trip on Redis)."""
        signed: list[UsageEvent] = []
        reports: list[tuple[str, str]] = []
        for event in events:
            claims = await self._verified(event)
            if claims is not None:
                signed.append(event)
                reports.append((claims.workspace_id, claims.reservation_id))
        if not signed:
            return []
        try:
            firsts = await self._replay.first_reports(reports, ttl_s=REPLAY_TTL_S)
        except ReplayCheckUnavailable as error:
            # Signed and fresh: counting them risks a replay only while Redis is down, dropping
            # them loses genuine reports for sure.
            self._metrics.replay_unchecked.inc(len(signed))
            log.warning(
                "usage: %d reservations (%s...) counted without the replay check: %s",
                len(signed),
                reports[0][1],
                error,
            )
            return signed
        admitted = []
        for event, first in zip(signed, firsts, strict=True):
            if first:
                admitted.append(event)
            else:
                self._refuse("replay", event)
        return admitted

    async def _verified(self, event: UsageEvent) -> Claims | None:
        """The claims, if signed by a key in force and fresh; else None, the event refused
        (counted and warned about)."""
        claims = event.claims
        if claims is None or not event.mac:
            reason = "unsigned"
        elif not await self._keyring.verify(claims, key_id=event.signing_key, mac=event.mac):
            reason = "bad_mac"
        elif not -CLOCK_SKEW_S <= self._clock() - claims.reserved_at <= MAX_AGE_S:
            reason = "too_old"
        else:
            return claims
        self._refuse(reason, event)
        return None

    def _refuse(self, reason: str, event: UsageEvent) -> None:
        self._metrics.entries_refused.labels(reason).inc()
        self._warn(reason, event)

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

    def __init__(
        self,
        accountant: UsageAccountant,
        *,
        gate: ReservationGate,
        write_every_s: float = WRITE_EVERY_S,
    ) -> None:
        self._accountant = accountant
        self._gate = gate
        self._writes = PacedWrites(self.write, interval=write_every_s)

    async def StreamAccessLogs(
        self,
        request_iterator: AsyncIterator[StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext[StreamAccessLogsMessage, StreamAccessLogsResponse],
    ) -> StreamAccessLogsResponse:
        try:
            async for message in request_iterator:
                await self.handle(message.http_logs.log_entry)
        finally:
            # The stream ended (shutdown stops reading it): write what it left in hand.
            await self._writes.now()
        return StreamAccessLogsResponse()

    async def write(self) -> None:
        """Write what accounting holds (the ledger; the accountant's timer retries failures)."""
        await self._accountant.flush()

    async def handle(self, entries: Iterable[HTTPAccessLogEntry]) -> None:
        """Account for the entries of one message from Envoy, all at once."""
        admitted = await self._account(entries)
        self.observe(admitted)
        # Written within Envoy's own buffering interval (authz/usage/pacing.py): a hard kill
        # loses at most that much.
        await self._writes.soon()

    def observe(self, admitted: list[UsageEvent]) -> None:
        """What else the admitted entries tell (ObservedAccessLog: their latency)."""

    async def _account(self, entries: Iterable[HTTPAccessLogEntry]) -> list[UsageEvent]:
        """The entries the gate admits, accounted for (the others are only counted)."""
        events = [event for event in map(parse_entry, entries) if event is not None]
        admitted = await self._gate.admit(events)
        if admitted:
            try:
                await self._accountant.record_batch(admitted)
            except StoreUnavailable as error:
                # Only the workspace lookup can fail here; keep the stream alive.
                log.warning("usage: %d entries not reconciled: %s", len(admitted), error)
        return admitted
