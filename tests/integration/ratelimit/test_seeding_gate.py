"""No open window after counter loss (issue 18, finding 5), on real Redis and PostgreSQL: a
Check that finds the month's counters missing seeds them from the ledger before it decides."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc
import pytest
import redis.asyncio
from envoy.service.auth.v3 import external_auth_pb2_grpc
from prometheus_client import CollectorRegistry

from authz.app import build
from authz.keys import mint_key
from authz.models import CLI_ACTOR, NewWorkspace
from authz.server import start
from authz.settings import Settings
from authz.store import open_store
from authz.store.base import Store
from authz.tracing import Tracing
from authz.usage.periods import hour_of
from tests.support.checks import bearer, check_request
from tests.support.fakes import ledger_row
from tests.support.redis_servers import RedisServer
from tests.unit.conftest import Started

pytestmark = pytest.mark.integration

QUOTA = 1000


@dataclass
class Gate:
    stub: external_auth_pb2_grpc.AuthorizationStub
    store: Store
    secret: str
    workspace_id: str


@pytest.fixture
async def gate(pg_dsn: str, own_redis: RedisServer) -> AsyncIterator[Gate]:
    settings = Settings(
        database_url=pg_dsn,
        redis_url=own_redis.url,
        grpc_addr="127.0.0.1:0",
        db_timeout_ms=2000,
        redis_timeout_ms=500,  # generous: 200 Checks at once on a busy 2-core machine
        redis_breaker_failures=10_000,
    )
    store = await open_store(pg_dsn, **settings.store_options())
    await store.migrate()
    workspace = await store.create_workspace(
        NewWorkspace(name="w", rpm=0, tpm=0, monthly_token_quota=QUOTA), actor=CLI_ACTOR
    )
    secret, key = mint_key(workspace.id, "app")
    await store.create_key(key, actor=CLI_ACTOR)
    # The month is used up in the ledger.
    row = ledger_row(workspace.id, key.id, hour_of(datetime.now(UTC)), QUOTA)
    assert await store.apply_usage_batch(uuid.uuid4().hex, [row])
    app = await build(settings, store=store, registry=CollectorRegistry(), tracing=Tracing())
    running = await start(app, serve_metrics=False)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.grpc_port}")
    try:
        yield Gate(external_auth_pb2_grpc.AuthorizationStub(channel), store, secret, workspace.id)
    finally:
        await Started(app, running, channel).stop()
        await app.limiter.close()
        await store.close()


async def _flushall(server: RedisServer) -> None:
    client = redis.asyncio.Redis.from_url(server.url)
    try:
        await client.flushall()
    finally:
        await client.aclose()


async def _statuses(gate: Gate, count: int) -> list[int]:
    request = check_request(headers=bearer(gate.secret))
    answers = await asyncio.gather(*(gate.stub.Check(request) for _ in range(count)))
    return [200 if a.HasField("ok_response") else a.denied_response.status.code for a in answers]


async def test_after_flushall_a_used_up_month_admits_none_of_200_concurrent_checks(
    gate: Gate, own_redis: RedisServer
) -> None:
    assert await _statuses(gate, 1) == [429]  # seeded from the ledger: used up
    await _flushall(own_redis)
    statuses = await _statuses(gate, 200)
    assert statuses.count(200) == 0
    assert set(statuses) == {429}
