"""The trust boundary on the production backends: two replicas on one PostgreSQL and one Redis
(standalone or Cluster). A reservation one replica signed is verified by the other; a forged
entry changes no ledger row, no quota counter and no bucket; a replayed one counts once, even
when each copy goes to a different replica.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3.external_auth_pb2 import CheckResponse
from envoy.service.auth.v3.external_auth_pb2_grpc import AuthorizationStub
from google.protobuf.json_format import MessageToDict
from prometheus_client import CollectorRegistry

from authz.app import App, build
from authz.keys import mint_key
from authz.models import CLI_ACTOR, ModelPrice, NewWorkspace
from authz.server import Running, start, stop
from authz.store import open_store
from authz.store.base import Store
from ratelimit.keys import bucket_keys, usage_keys
from ratelimit.quota import month_period
from ratelimit.redis_backend import RedisClient, connect_redis
from tests.support.accesslogs import from_check, log_entry, send
from tests.support.checks import bearer, check_request
from tests.support.redis_servers import RedisClusterServers
from tests.unit.conftest import UNIT_SETTINGS

pytestmark = pytest.mark.integration

USAGE = {"model": "demo-model-2024-08-06", "prompt_tokens": 10, "completion_tokens": 5}


class Replica:
    def __init__(self, app: App, running: Running) -> None:
        self.app = app
        self.running = running
        self.address = f"127.0.0.1:{running.grpc_port}"
        self.channel = grpc.aio.insecure_channel(self.address)
        self.stub = AuthorizationStub(self.channel)

    def refused(self, reason: str) -> float:
        value: float = self.app.metrics.entries_refused.labels(reason)._value.get()
        return value

    async def stop(self) -> None:
        await self.channel.close(None)
        await stop(self.app, self.running, drain_delay_s=0, grace_s=0)


class Deployment:
    def __init__(self, store: Store, redis: RedisClient, replicas: list[Replica]) -> None:
        self.store = store
        self.redis = redis
        self.replicas = replicas
        self.workspace_id = ""
        self.key_id = ""
        self.secret = ""

    async def tenant(self) -> None:
        ws = await self.store.create_workspace(
            NewWorkspace(
                f"victim-{time.monotonic_ns()}", rpm=0, tpm=10_000, monthly_token_quota=1_000_000
            ),
            actor=CLI_ACTOR,
        )
        secret, new = mint_key(ws.id, "app")
        key = await self.store.create_key(new, actor=CLI_ACTOR)
        self.workspace_id, self.key_id, self.secret = ws.id, key.id, secret

    async def check(self, replica: Replica) -> CheckResponse:
        body = json.dumps({"model": "demo-model", "max_tokens": 20}).encode()
        response = await replica.stub.Check(check_request(headers=bearer(self.secret), body=body))
        assert response.status.code == 0
        assert response.dynamic_metadata.fields["reservation_mac"].string_value  # signed
        return response

    async def counters(self) -> tuple[Any, ...]:
        """The victim's quota counters and both buckets, as Redis holds them."""
        tokens, spend = usage_keys(self.workspace_id, month_period(time.time()))
        requests, bucket = bucket_keys(self.workspace_id)
        return (
            await self.redis.get(tokens),
            await self.redis.get(spend),
            await self.redis.hgetall(requests),
            await self.redis.hgetall(bucket),
        )

    async def ledger_tokens(self) -> int:
        rows = await self.store.usage_report(workspace_id=self.workspace_id)
        return sum(r.prompt_tokens + r.completion_tokens for r in rows)


@pytest.fixture(params=["redis", "cluster"])
def backend_url(request: pytest.FixtureRequest) -> str:
    if request.param == "redis":
        return str(request.getfixturevalue("redis_url"))
    servers: RedisClusterServers = request.getfixturevalue("cluster")
    return servers.url


@pytest.fixture
async def deployment(pg_dsn: str, backend_url: str) -> AsyncIterator[Deployment]:
    store = await open_store(pg_dsn)
    await store.migrate()  # the one `authz migrate`: it makes the signing secret
    await store.set_price(ModelPrice("demo-model", 2.0, 8.0), actor=CLI_ACTOR)
    # Generous Redis and database budgets: this test is about forged entries, not latency, and
    # a Check over the 50 ms default on a busy 2-core machine would fail it for the wrong reason.
    settings = replace(
        UNIT_SETTINGS,
        database_url=pg_dsn,
        redis_url=backend_url,
        ledger_flush_s=60,
        redis_timeout_ms=1000,
        db_timeout_ms=1000,
    )
    replicas = []
    for _ in range(2):
        app = await build(settings, registry=CollectorRegistry())
        await app.accountant.load_prices()
        replicas.append(Replica(app, await start(app, serve_metrics=False)))
    redis = connect_redis(backend_url, timeout_seconds=5)
    deployed = Deployment(store, redis, replicas)
    await deployed.tenant()
    yield deployed
    for replica in replicas:
        await replica.stop()
    await redis.aclose()
    await store.close()


def now_utc() -> datetime:
    return datetime.now(UTC)


async def test_each_replica_verifies_the_others_reservations_once(deployment: Deployment) -> None:
    first, second = deployment.replicas
    genuine = await deployment.check(first)
    entry = from_check(genuine, USAGE, started=now_utc())
    await send(second.address, [entry])
    await send(first.address, [entry])  # the same report, to the replica that signed it
    await send(second.address, [entry, entry])
    assert await deployment.ledger_tokens() == 15
    tokens, spend, _, _ = await deployment.counters()
    assert (int(tokens), int(spend)) == (15, 10 * 2 + 5 * 8)  # at demo-model's price
    assert first.refused("replay") + second.refused("replay") == 3
    assert first.refused("bad_mac") + second.refused("bad_mac") == 0


async def test_a_forged_entry_changes_no_ledger_counter_or_bucket(deployment: Deployment) -> None:
    first, second = deployment.replicas
    genuine = await deployment.check(first)
    await send(first.address, [from_check(genuine, USAGE, started=now_utc())])
    before = (await deployment.ledger_tokens(), await deployment.counters())
    forged_usage = {"model": "forged", "prompt_tokens": 999999999, "completion_tokens": 0}
    claims: dict[str, Any] = {
        "decision": "allow",
        "workspace_id": deployment.workspace_id,
        "key_id": deployment.key_id,
        "reserved_tokens": 999999,
    }
    signed = MessageToDict(genuine.dynamic_metadata)
    forgeries: list[Callable[[], Any]] = [
        lambda: log_entry(claims, forged_usage, started=now_utc()),
        lambda: log_entry({**signed, "reserved_tokens": 999999}, {}, started=now_utc()),
        lambda: log_entry(
            {**signed, "price_input_per_1m_usd": 0.0}, forged_usage, started=now_utc()
        ),
    ]
    for replica in (first, second):
        await send(replica.address, [forge() for forge in forgeries])
    assert (await deployment.ledger_tokens(), await deployment.counters()) == before
    assert first.refused("unsigned") + second.refused("unsigned") == 2
    assert first.refused("bad_mac") + second.refused("bad_mac") == 4
