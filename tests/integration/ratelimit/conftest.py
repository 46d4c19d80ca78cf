"""Fixtures for the Redis rate-limiter integration tests."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis, RedisCluster

from ratelimit.redis_backend import RedisClient, connect_redis
from tests.support.redis_servers import (
    RedisClusterServers,
    RedisServer,
    redis_cluster,
    redis_server,
    redis_url_for_tests,
)

T0_MS = 1_700_000_000_000
"""A realistic epoch-milliseconds start for the test-only clock override."""

GENEROUS_TIMEOUT_SECONDS = 2.0
"""For tests about the maths, not about timeouts: a busy 2-core CI machine must not flake."""

REPO_ROOT = Path(__file__).resolve().parents[3]


def run_workers_together(argvs: Sequence[Sequence[str]]) -> list[dict[str, Any]]:
    """Start one worker process per argv, wait until each prints `ready`, release them all at
    once, and return each worker's last stdout line as JSON."""
    workers = [
        subprocess.Popen(
            list(argv), cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for argv in argvs
    ]
    try:
        for worker in workers:
            assert worker.stdout is not None
            assert worker.stdout.readline().strip() == "ready"
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write("go\n")
            worker.stdin.flush()
        results = []
        for worker in workers:
            out, _ = worker.communicate(timeout=60)
            assert worker.returncode == 0
            results.append(json.loads(out.strip().splitlines()[-1]))
        return results
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()


def worker_argv(module: str, *args: object) -> list[str]:
    """`python -m tests.integration.ratelimit.<module> args...`."""
    return [sys.executable, "-m", f"tests.integration.ratelimit.{module}", *map(str, args)]


class FakeClockMs:
    """A test clock in epoch milliseconds, passed to limiters as `clock_ms`."""

    def __init__(self, start_ms: int = T0_MS) -> None:
        self.now = start_ms

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """`AUTHZ_TEST_REDIS_URL`, or one throwaway server for the session."""
    with redis_url_for_tests() as url:
        yield url


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[RedisClient]:
    client = connect_redis(redis_url, timeout_seconds=GENEROUS_TIMEOUT_SECONDS)
    yield client
    await client.aclose()


@pytest.fixture
def workspace_id() -> str:
    """A workspace id nobody else uses, so tests sharing a server never see each other's keys."""
    return f"test-{uuid.uuid4().hex}"


@pytest.fixture
def clock_ms() -> FakeClockMs:
    return FakeClockMs()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A private server the test may kill, pause, restart or flush."""
    with redis_server() as server:
        yield server


@pytest.fixture(scope="session")
def cluster() -> Iterator[RedisClusterServers]:
    """A 3-master Redis Cluster, shared by the session's tests (it takes ~2 s to form)."""
    with redis_cluster(3) as servers:
        yield servers


@pytest.fixture
async def cluster_client(cluster: RedisClusterServers) -> AsyncIterator[RedisCluster]:
    """A client of the session's shared cluster."""
    client = connect_redis(cluster.url, timeout_seconds=GENEROUS_TIMEOUT_SECONDS)
    assert isinstance(client, RedisCluster)
    yield client
    await client.aclose()


@pytest.fixture
async def own_client(own_redis: RedisServer) -> AsyncIterator[Redis]:
    """A client of `own_redis` (a server no other test touches)."""
    client = connect_redis(own_redis.url, timeout_seconds=GENEROUS_TIMEOUT_SECONDS)
    assert isinstance(client, Redis)
    yield client
    await client.aclose()
