"""Access-log entries → latency buckets and denials, tallied and flushed once per batch."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from envoy.data.accesslog.v3.accesslog_pb2 import HTTPAccessLogEntry
from google.protobuf.struct_pb2 import Struct

from authz.usage.events import EXT_AUTHZ_NAMESPACE
from authz.usage.latency import bucket_of
from authz.usage.observations import ObservationSink, observation
from authz.usage.observed import DenialRow, LatencyRow
from tests.support.fakes import FakeStore

STARTED = datetime(2026, 11, 27, 9, 41, 5, tzinfo=UTC)
HOUR = STARTED.replace(minute=0, second=0)


def entry(status: int, ms: float | None, **authz: str) -> HTTPAccessLogEntry:
    log = HTTPAccessLogEntry()
    log.common_properties.start_time.FromDatetime(STARTED)
    if ms is not None:
        log.common_properties.time_to_last_downstream_tx_byte.FromTimedelta(
            timedelta(milliseconds=ms)
        )
    if authz:
        fields = Struct()
        fields.update(authz)
        log.common_properties.metadata.filter_metadata[EXT_AUTHZ_NAMESPACE].CopyFrom(fields)
    log.response.response_code.value = status
    return log


ALLOW = {"decision": "allow", "workspace_id": "ws_a", "key_id": "key_a"}


def test_entries_become_buckets_or_reasons() -> None:
    assert observation(entry(200, 12.0, **ALLOW)) == (HOUR, "ws_a", "key_a", bucket_of(0.012))
    assert observation(entry(200, None, **ALLOW)) is None  # the client left before an answer
    quota = entry(429, 1.0, decision="deny", code="insufficient_quota", workspace_id="ws_a",
                  key_id="key_a", type="insufficient_quota")  # fmt: skip
    assert observation(quota) == (HOUR, "ws_a", "key_a", "insufficient_quota")
    rpm = entry(429, 1.0, decision="deny", code="rate_limit_exceeded", workspace_id="ws_a",
                key_id="key_a", type="requests")  # fmt: skip
    assert observation(rpm) == (HOUR, "ws_a", "key_a", "rate_limit_requests")
    # An unknown key's 401 names no workspace: nobody's page can show it.
    assert observation(entry(401, 1.0, decision="deny", code="invalid_api_key")) is None
    assert observation(entry(200, 3.0)) is None  # not through our Check (the console route)


async def test_sink_flushes_once_and_retries_after_an_outage() -> None:
    store = FakeStore()
    await store.migrate()
    sink = ObservationSink(store=store)
    for ms in (10.0, 10.0, 900.0):
        sink.observe(entry(200, ms, **ALLOW))
    sink.observe(entry(401, 1.0, decision="deny", code="invalid_api_key", workspace_id="ws_a",
                       key_id="key_old"))  # fmt: skip
    store.down = True
    await sink.flush()  # the outage is logged, and the batch kept for the next flush
    assert store.observations == {}
    store.down = False
    await sink.flush()
    await sink.flush()  # nothing new: nothing written twice
    latency = await store.latency_report("ws_a", HOUR, HOUR + timedelta(hours=1))
    assert {(r.bucket, r.count) for r in latency} == {(bucket_of(0.010), 2), (bucket_of(0.9), 1)}
    denials = await store.denial_report("ws_a", HOUR, HOUR + timedelta(hours=1))
    assert [(r.key_id, r.reason, r.count) for r in denials] == [("key_old", "unauthenticated", 1)]


class GatedStore(FakeStore):
    """Holds every batch write until `gate` opens, as a slow database would."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_open = asyncio.Event()

    async def apply_observation_batch(
        self, batch_id: str, latency: Sequence[LatencyRow], denials: Sequence[DenialRow]
    ) -> bool:
        await self.gate_open.wait()
        return await super().apply_observation_batch(batch_id, latency, denials)


async def test_concurrent_flushes_from_two_streams_lose_nothing() -> None:
    store = GatedStore()
    await store.migrate()
    sink = ObservationSink(store=store)
    sink.observe(entry(200, 10.0, **ALLOW))
    first = asyncio.create_task(sink.flush())
    await asyncio.sleep(0)  # the first stream's flush is now waiting inside its write
    sink.observe(entry(200, 900.0, **ALLOW))
    second = asyncio.create_task(sink.flush())
    await asyncio.sleep(0)
    store.gate_open.set()
    await asyncio.gather(first, second)
    latency = await store.latency_report("ws_a", HOUR, HOUR + timedelta(hours=1))
    assert {(r.bucket, r.count) for r in latency} == {(bucket_of(0.010), 1), (bucket_of(0.9), 1)}
