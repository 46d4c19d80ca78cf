"""A replica whose PostgreSQL pool has run out: UNAVAILABLE (Envoy's 503), never a false 401.

LiteLLM users saw every key fail with 401 once the database ran out of connections; here an
uncached key that cannot be looked up is an outage, counted and named by readiness.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import asyncpg
import grpc
import pytest
from envoy.service.auth.v3.external_auth_pb2_grpc import AuthorizationStub
from google.rpc import code_pb2
from prometheus_client import CollectorRegistry

from authz.app import App, build
from authz.keys import mint_key
from authz.models import CLI_ACTOR, NewWorkspace
from authz.server import start, stop
from authz.store import open_store
from authz.tracing import Tracing
from tests.support.checks import bearer, check_request
from tests.unit.conftest import UNIT_SETTINGS

pytestmark = pytest.mark.integration

_TIMEOUT_MS = 1500


@dataclass
class Replica:
    app: App
    registry: CollectorRegistry
    stub: AuthorizationStub

    def sample(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    async def check(self, secret: str) -> grpc.StatusCode | int:
        """UNAVAILABLE as the gRPC status Envoy maps to 503; else the HTTP status decided."""
        try:
            answer = await self.stub.Check(check_request(headers=bearer(secret)), timeout=10)
        except grpc.aio.AioRpcError as error:
            return error.code()
        if answer.status.code == code_pb2.OK:
            return 200
        return int(answer.denied_response.status.code)


@pytest.fixture
async def replica(pg_dsn: str) -> AsyncIterator[Replica]:
    store = await open_store(pg_dsn)
    await store.migrate()
    await store.close()
    # One pooled connection, so one blocked query exhausts it.
    settings = replace(
        UNIT_SETTINGS, database_url=pg_dsn, db_pool_size=1, db_timeout_ms=_TIMEOUT_MS
    )
    registry = CollectorRegistry()
    app = await build(settings, registry=registry, tracing=Tracing())
    running = await start(app, serve_metrics=False)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.grpc_port}") as channel:
        yield Replica(app, registry, AuthorizationStub(channel))
    await stop(app, running, drain_delay_s=0, grace_s=0)


async def _new_keys(pg_dsn: str, count: int) -> list[str]:
    store = await open_store(pg_dsn)
    try:
        workspace = await store.create_workspace(NewWorkspace(name="acme"), actor=CLI_ACTOR)
        secrets = []
        for _ in range(count):
            secret, key = mint_key(workspace.id, "app")
            await store.create_key(key, actor=CLI_ACTOR)
            secrets.append(secret)
        return secrets
    finally:
        await store.close()


async def test_uncached_keys_get_unavailable_while_the_pool_is_exhausted(
    replica: Replica, pg_dsn: str
) -> None:
    # Distinct keys: concurrent misses for one key share a single lookup.
    secrets = await _new_keys(pg_dsn, 3)
    assert replica.sample("authz_db_pool_size") == 1
    assert await replica.app.readiness.probe()

    # Another session locks the keys table: the first lookup holds the only connection, stuck
    # behind the lock, and the others queue for the pool until their timeout.
    blocker = await asyncpg.connect(pg_dsn, timeout=10)
    try:
        locked = blocker.transaction()
        await locked.start()
        await blocker.execute("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE")
        checks = [asyncio.create_task(replica.check(secret)) for secret in secrets]
        async with asyncio.timeout(10):
            while replica.sample("authz_db_pool_acquires_waiting") < 2:
                await asyncio.sleep(0.01)
        assert replica.sample("authz_db_pool_connections_in_use") == 1
        answers = await asyncio.gather(*checks)
        assert answers == [grpc.StatusCode.UNAVAILABLE] * 3  # no 401 among them
        assert replica.sample("authz_db_pool_waits_total", result="gave_up") >= 2

        # Readiness names the cause while calls give up for want of a connection.
        assert not await replica.app.readiness.probe()
        assert replica.sample("authz_ready", component="db_pool") == 0
        await locked.rollback()
    finally:
        await blocker.close()

    # The lock gone, the same key is authorized and readiness recovers at the next probe.
    assert [await replica.check(secret) for secret in secrets] == [200] * 3
    assert await replica.app.readiness.probe()
    assert replica.sample("authz_ready", component="db_pool") == 1
    assert replica.sample("authz_db_pool_connections_in_use") == 0
    assert replica.sample("authz_db_pool_acquires_waiting") == 0
