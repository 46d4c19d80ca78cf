"""The health-only port, and TLS with client certificates on the gRPC port."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc
from google.rpc import code_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from authz.app import App, build
from authz.health import AUTHZ_SERVICE
from authz.keys import generate_key
from authz.server import Running, start, stop
from authz.settings import Settings
from tests.support.certs import Pki, make_pki
from tests.support.checks import bearer, check_request
from tests.support.fakes import FakeStore, workspace
from tests.unit.conftest import UNIT_SETTINGS

SERVING = health_pb2.HealthCheckResponse.SERVING


async def started(settings: Settings, store: FakeStore | None = None) -> tuple[App, Running]:
    app = await build(settings, store=store or FakeStore())
    return app, await start(app, serve_metrics=False)


@pytest.fixture
async def health_only() -> AsyncIterator[tuple[App, Running]]:
    app, running = await started(replace(UNIT_SETTINGS, health_addr="127.0.0.1:0"))
    yield app, running
    await stop(app, running, drain_delay_s=0, grace_s=0)


async def test_health_port_serves_health_and_nothing_else(
    health_only: tuple[App, Running],
) -> None:
    _, running = health_only
    assert running.health_port not in {None, running.grpc_port}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.health_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", AUTHZ_SERVICE):
            answer = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert answer.status == SERVING
        with pytest.raises(grpc.aio.AioRpcError) as check:
            await external_auth_pb2_grpc.AuthorizationStub(channel).Check(check_request())
        assert check.value.code() == grpc.StatusCode.UNIMPLEMENTED
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        with pytest.raises(grpc.aio.AioRpcError) as reflected:
            async for _ in reflect:
                pass
        assert reflected.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_health_port_goes_not_serving_on_shutdown(health_only: tuple[App, Running]) -> None:
    app, running = health_only
    await app.readiness.shutdown()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.health_port}") as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=AUTHZ_SERVICE)
        )
    assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path)


def tls_settings(pki: Pki) -> Settings:
    return replace(
        UNIT_SETTINGS,
        tls_cert=str(pki.server_cert),
        tls_key=str(pki.server_key),
        tls_client_ca=str(pki.ca),
    )


async def test_tls_with_a_client_certificate_checks_and_without_one_is_refused(pki: Pki) -> None:
    store = FakeStore()
    key = generate_key()
    store.add(key, workspace())
    app, running = await started(tls_settings(pki), store)
    target = f"localhost:{running.grpc_port}"
    try:
        with_cert = grpc.ssl_channel_credentials(
            root_certificates=pki.ca.read_bytes(),
            private_key=pki.client_key.read_bytes(),
            certificate_chain=pki.client_cert.read_bytes(),
        )
        async with grpc.aio.secure_channel(target, with_cert) as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            response = await stub.Check(check_request(headers=bearer(key)), timeout=10)
        assert response.status.code == code_pb2.OK

        without_cert = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
        async with grpc.aio.secure_channel(target, without_cert) as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Check(check_request(headers=bearer(key)), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

        async with grpc.aio.insecure_channel(target) as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as plaintext:
                await stub.Check(check_request(headers=bearer(key)), timeout=10)
        assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await stop(app, running, drain_delay_s=0, grace_s=0)
