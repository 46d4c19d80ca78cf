"""Shutdown: every accepted Check is answered, and Envoy's open access-log stream does not
hold the grace period."""

from __future__ import annotations

import asyncio

from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from google.rpc import code_pb2
from grpc_health.v1 import health_pb2

from authz.health import AUTHZ_SERVICE
from authz.keys import generate_key
from authz.server import stop
from tests.support.checks import bearer, check_request
from tests.support.fakes import workspace
from tests.unit.conftest import start_sidecar

# Far longer than the ceiling below: stop() finishing under it proves nothing waited it out.
GRACE_S = 600.0
CEILING_S = 30.0
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_open_access_log_stream_ends_on_shutdown_and_in_flight_check_is_answered() -> None:
    sidecar, started = await start_sidecar()
    channel = started.channel
    key = generate_key()
    sidecar.store.add(key, workspace())
    sidecar.store.gate = asyncio.Event()

    # Envoy's stream: one (empty) batch sent, then held open as Envoy does.
    outgoing: asyncio.Queue[als_pb2.StreamAccessLogsMessage | None] = asyncio.Queue()

    async def envoy_messages() -> object:
        while (message := await outgoing.get()) is not None:
            yield message

    als = als_pb2_grpc.AccessLogServiceStub(channel).StreamAccessLogs(envoy_messages())
    await outgoing.put(als_pb2.StreamAccessLogsMessage())
    check = asyncio.ensure_future(sidecar.stub.Check(check_request(headers=bearer(key))))
    async with asyncio.timeout(CEILING_S):
        while sidecar.store.lookups == 0:
            await asyncio.sleep(0.005)

    stopping = asyncio.ensure_future(
        stop(started.app, started.running, drain_delay_s=0, grace_s=GRACE_S)
    )
    # Asked in-process: over the channel, a probe sent as the server stops taking calls can
    # hang for the whole grace period (seen under load), since nothing serves it.
    probe = health_pb2.HealthCheckRequest(service=AUTHZ_SERVICE)
    async with asyncio.timeout(CEILING_S):
        while (await started.app.health.Check(probe, None)).status != NOT_SERVING:
            await asyncio.sleep(0.005)
    assert not check.done()
    sidecar.store.gate.set()

    async with asyncio.timeout(CEILING_S):
        response = await check
        assert response.status.code == code_pb2.OK
        await als  # the sidecar answered and closed the stream; Envoy never closed it
        await stopping
    await channel.close(None)
