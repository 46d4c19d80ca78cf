"""Workspace buckets on real Redis behind real Envoy: headers, atomicity, one round trip, faults."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
from envoy.service.auth.v3 import external_auth_pb2_grpc
from google.rpc import code_pb2

from tests.e2e.conftest import build_stack
from tests.support.checks import bearer, check_request
from tests.support.redis_servers import (
    RedisServer,
    redis_cluster,
    redis_url_for_tests,
    start_redis_server,
)
from tests.support.stack import (
    FEED_LOGS,
    Sidecar,
    Stack,
    authz_cli,
    change_applied_after,
    start_sidecar,
    wait_until,
)

pytestmark = pytest.mark.e2e


def workspace_key(database_url: str, *, rpm: int, tpm: int) -> tuple[str, dict[str, str]]:
    workspace = authz_cli(
        database_url,
        "workspace",
        "create",
        f"ws-{time.monotonic_ns()}",
        "--rpm",
        str(rpm),
        "--tpm",
        str(tpm),
        "--default-completion-tokens",
        "10",
    )
    key = authz_cli(database_url, "key", "create", "--workspace", workspace["id"], "--label", "t")
    return workspace["id"], key


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def redis_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    log_dir = tmp_path_factory.mktemp("redis-stack")
    with redis_url_for_tests() as url:
        yield from build_stack(
            log_dir, f"sqlite:///{log_dir / 'authz.db'}", env={"AUTHZ_REDIS_URL": url, **FEED_LOGS}
        )


def test_burst_then_429_exactly_as_a_client_sees_it(redis_stack: Stack) -> None:
    _, key = workspace_key(redis_stack.database_url, rpm=5, tpm=100_000)
    answers = [redis_stack.request("/v1/models", headers=auth(key["secret"])) for _ in range(6)]
    assert [a.status for a in answers] == [200] * 5 + [429]
    assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == [
        "4", "3", "2", "1", "0", "0",
    ]  # fmt: skip
    denied = answers[-1]
    assert denied.headers["retry-after"] == "12"
    assert denied.headers["content-type"] == "application/json"
    assert denied.headers["x-ratelimit-limit-requests"] == "5"
    assert denied.headers["x-ratelimit-limit-tokens"] == "100000"
    assert denied.headers["x-ratelimit-reset-requests"].endswith("s")
    error = json.loads(denied.body)["error"]
    assert (error["code"], error["type"], error["param"]) == (
        "rate_limit_exceeded",
        "requests",
        None,
    )
    assert "Limit 5, Used 5, Requested 1" in error["message"]
    assert "try again in 12s" in error["message"]


def test_request_larger_than_tpm_says_so(redis_stack: Stack) -> None:
    workspace_id, key = workspace_key(redis_stack.database_url, rpm=100, tpm=1000)
    body = json.dumps({"model": "m", "max_tokens": 5000, "messages": []}).encode()
    answer = redis_stack.request("/v1/chat/completions", headers=auth(key["secret"]), body=body)
    assert answer.status == 429
    error = json.loads(answer.body)["error"]
    assert (error["code"], error["type"]) == ("rate_limit_exceeded", "tokens")
    requested = 5000 + math.ceil(len(body) / 4)
    assert f"Request too large for workspace {workspace_id}" in error["message"]
    assert f"Limit 1000, Requested {requested}" in error["message"]


def test_live_limit_change_reaches_the_sidecar_within_one_second(redis_stack: Stack) -> None:
    workspace_id, key = workspace_key(redis_stack.database_url, rpm=1, tpm=100_000)
    assert redis_stack.request("/v1/models", headers=auth(key["secret"])).status == 200
    assert redis_stack.request("/v1/models", headers=auth(key["secret"])).status == 429
    updated = authz_cli(
        redis_stack.database_url, "workspace", "update", workspace_id, "--rpm", "600"
    )
    wait_until(
        lambda: redis_stack.request("/v1/models", headers=auth(key["secret"])).status == 200,
        timeout=10,
        what="new limit live",
    )
    # From the commit to the sidecar applying it, by the sidecar's own log line.
    assert change_applied_after(redis_stack.sidecar, "ws", updated["updated_at"]) < 1.0
    answer = redis_stack.request("/v1/models", headers=auth(key["secret"]))
    assert answer.headers["x-ratelimit-limit-requests"] == "600"


async def _fire(addresses: list[str], secret: str, count: int) -> list[int]:
    """`count` concurrent checks spread over the sidecars; the gRPC status code of each."""
    channels = [grpc.aio.insecure_channel(a) for a in addresses]
    stubs = [external_auth_pb2_grpc.AuthorizationStub(c) for c in channels]
    request = check_request(headers=bearer(secret))

    async def one(i: int) -> int:
        try:
            response = await stubs[i % len(stubs)].Check(request, timeout=10)
        except grpc.aio.AioRpcError as error:
            code: int = error.code().value[0]
            return -code
        return int(response.status.code)

    try:
        return list(await asyncio.gather(*(one(i) for i in range(count))))
    finally:
        for channel in channels:
            await channel.close(None)


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = start_redis_server()
    try:
        yield server
    finally:
        server.close()


def _sidecars(tmp_path: Path, url: str, n: int, **env: str) -> list[Sidecar]:
    database = f"sqlite:///{tmp_path / 'authz.db'}"
    authz_cli(database, "migrate")
    started: list[Sidecar] = []
    try:
        for i in range(n):
            started.append(
                start_sidecar(
                    tmp_path,
                    database_url=database,
                    name=f"sidecar{i}",
                    env={"AUTHZ_REDIS_URL": url, **env},
                )
            )
    except BaseException:
        for sidecar in started:
            sidecar.process.stop()
        raise
    return started


def test_three_replicas_never_over_admit(tmp_path: Path, own_redis: RedisServer) -> None:
    # This test is about over-admission, not latency: three sidecars and the client share two
    # cores here, so a 50 ms budget would turn CPU queueing into timeouts and open breakers.
    replicas = _sidecars(tmp_path, own_redis.url, 3, AUTHZ_REDIS_TIMEOUT_MS="2000")
    try:
        database = f"sqlite:///{tmp_path / 'authz.db'}"
        _, key = workspace_key(database, rpm=100, tpm=0)
        started = time.monotonic()
        codes = asyncio.run(_fire([r.grpc_addr for r in replicas], key["secret"], 300))
        elapsed = time.monotonic() - started
        admitted = codes.count(code_pb2.OK)
        assert codes.count(code_pb2.PERMISSION_DENIED) == 300 - admitted, sorted(set(codes))
        # Capacity 100, refilled at 100/60 per second while the burst ran: no more than that.
        assert 100 <= admitted <= 100 + math.floor(elapsed * 100 / 60) + 1
    finally:
        for replica in replicas:
            replica.process.stop()


def test_one_redis_round_trip_per_check(tmp_path: Path, own_redis: RedisServer) -> None:
    (sidecar,) = _sidecars(tmp_path, own_redis.url, 1, AUTHZ_HEALTH_INTERVAL_S="60")
    try:
        database = f"sqlite:///{tmp_path / 'authz.db'}"
        _, key = workspace_key(database, rpm=10_000, tpm=1_000_000)
        asyncio.run(_fire([sidecar.grpc_addr], key["secret"], 1))  # loads the script
        client = redis.Redis(port=own_redis.port)
        client.config_resetstat()
        for _ in range(40):
            assert asyncio.run(_fire([sidecar.grpc_addr], key["secret"], 1)) == [code_pb2.OK]
        stats = client.info("commandstats")
        calls = {name: value["calls"] for name, value in stats.items()}
        # Commands the script runs inside Redis, and our own probes, are not round trips.
        for inside in ("hmget", "hset", "pexpire", "time", "info", "config|resetstat"):
            calls.pop(f"cmdstat_{inside}", None)
        assert calls == {"cmdstat_evalsha": 40}
        client.close()
    finally:
        sidecar.process.stop()


def test_script_flush_mid_run_fails_nothing(tmp_path: Path, own_redis: RedisServer) -> None:
    (sidecar,) = _sidecars(tmp_path, own_redis.url, 1)
    try:
        database = f"sqlite:///{tmp_path / 'authz.db'}"
        _, key = workspace_key(database, rpm=10_000, tpm=1_000_000)
        client = redis.Redis(port=own_redis.port)
        for _ in range(3):
            assert asyncio.run(_fire([sidecar.grpc_addr], key["secret"], 20)) == [0] * 20
            client.script_flush()
        client.close()
    finally:
        sidecar.process.stop()


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_redis_dies_and_returns(tmp_path: Path, own_redis: RedisServer, mode: str) -> None:
    (sidecar,) = _sidecars(tmp_path, own_redis.url, 1, AUTHZ_FAILURE_MODE=mode)
    try:
        database = f"sqlite:///{tmp_path / 'authz.db'}"
        _, key = workspace_key(database, rpm=10_000, tpm=1_000_000)
        assert asyncio.run(_fire([sidecar.grpc_addr], key["secret"], 10)) == [0] * 10

        def errors(kind: str) -> float:
            return sidecar.metric("authz_ratelimit_redis_errors_total", kind=kind)

        def failed_calls() -> float:
            return sum(errors(kind) for kind in ("connection", "timeout", "other", "overload"))

        own_redis.kill()
        waited_before = errors("timeout") + errors("overload")
        codes = asyncio.run(_fire([sidecar.grpc_addr], key["secret"], 50))
        if mode == "closed":
            assert set(codes) == {-grpc.StatusCode.UNAVAILABLE.value[0]}
            wait_until(lambda: not sidecar.ready(), timeout=30, what="readiness follows Redis")
        else:
            assert codes == [0] * 50
            assert "authz_fail_open_admissions_total 50.0" in sidecar.metrics()
            assert sidecar.ready()
        # The circuit breaker makes a dead Redis cheap: no check waited out a 50 ms timeout
        # (the sidecar's own count, whatever the scheduling of the test's processes) ...
        assert errors("timeout") + errors("overload") == waited_before
        # ... the circuit opened and refused calls without trying Redis.
        assert errors("circuit_open") > 0

        own_redis.start()
        failed_before = failed_calls()
        wait_until(
            lambda: (
                asyncio.run(_fire([sidecar.grpc_addr], key["secret"], 1)) == [0]
                and "authz_fail_open" not in _last_upstream_flags(sidecar, key["secret"])
            ),
            timeout=30,
            what="recovery",
        )
        # Within a second of Redis returning: the breaker lets one probe through per 0.25 s
        # cool-down, and at most the first 3 of them failed (counted by the sidecar itself).
        assert failed_calls() - failed_before <= 3
        wait_until(sidecar.ready, timeout=30, what="ready again")
    finally:
        sidecar.process.stop()


def _last_upstream_flags(sidecar: Sidecar, secret: str) -> str:
    """Upstream headers the sidecar would set now; names only."""
    with grpc.insecure_channel(sidecar.grpc_addr) as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        response = stub.Check(check_request(headers=bearer(secret)), timeout=2)
    return " ".join(h.header.key for h in response.ok_response.headers)


def test_sidecar_on_a_redis_cluster(tmp_path: Path) -> None:
    with redis_cluster(3) as cluster:
        (sidecar,) = _sidecars(tmp_path, cluster.url, 1)
        try:
            database = f"sqlite:///{tmp_path / 'authz.db'}"
            # Several workspaces, so their buckets land on different masters.
            for _ in range(3):
                _, key = workspace_key(database, rpm=3, tpm=100_000)
                codes = [
                    asyncio.run(_fire([sidecar.grpc_addr], key["secret"], 1))[0] for _ in range(4)
                ]
                assert codes == [code_pb2.OK] * 3 + [code_pb2.PERMISSION_DENIED]
        finally:
            sidecar.process.stop()
