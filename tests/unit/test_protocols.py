"""Health `List`, reflection v1 and v1alpha, and warnings rate-limited per reason."""

from __future__ import annotations

import logging

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from authz.health import AUTHZ_SERVICE
from authz.keys import generate_key
from authz.logs import ThrottledLog
from tests.support.checks import bearer, check_request
from tests.support.clock import FakeClock
from tests.unit.conftest import Sidecar

SERVING = health_pb2.HealthCheckResponse.SERVING


async def test_health_list_names_liveness_and_readiness(sidecar: Sidecar) -> None:
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        listed = await health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest())
    statuses = {name: answer.status for name, answer in listed.statuses.items()}
    assert statuses == {"": SERVING, AUTHZ_SERVICE: SERVING}


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_reflection_lists_the_services_under_both_versions(
    sidecar: Sidecar, version: str
) -> None:
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        call = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        responses = [
            response
            async for response in call(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
        ]
    names = {service.name for service in responses[0].list_services_response.service}
    assert {
        "envoy.service.auth.v3.Authorization",
        "grpc.health.v1.Health",
        "envoy.service.accesslog.v3.AccessLogService",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names


def test_throttled_log_one_line_per_reason_per_interval_with_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock(0.0)
    warnings = ThrottledLog(logging.getLogger("authz.test"), interval_s=10, clock=clock)
    with caplog.at_level(logging.WARNING):
        for _ in range(500):
            warnings.warning("redis", "redis down: %s", "timeout")
            warnings.warning("store", "store down")
            clock.now += 0.01  # 500 calls over 5 s
        clock.now = 10.5
        warnings.warning("redis", "redis down: %s", "timeout")
    assert caplog.messages == [
        "redis down: timeout",
        "store down",
        "redis down: timeout (and 499 more since the last such line)",
    ]


async def test_store_outage_warns_once_per_interval_not_per_check(
    sidecar: Sidecar, caplog: pytest.LogCaptureFixture
) -> None:
    sidecar.store.down = True
    with caplog.at_level(logging.WARNING, logger="authz.check"):
        for _ in range(20):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await sidecar.stub.Check(check_request(headers=bearer(generate_key())))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    lines = [r.getMessage() for r in caplog.records if r.name == "authz.check"]
    assert len(lines) == 1
    assert lines[0].startswith("check: database unavailable for an uncached key")
