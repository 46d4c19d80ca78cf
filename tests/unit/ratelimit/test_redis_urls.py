"""Redis URL forms understood by connect_redis (no server needed: clients connect lazily)."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import SSLConnection

from ratelimit.keys import bucket_keys
from ratelimit.redis_backend import connect_redis
from ratelimit.redis_cluster import parse_cluster_url
from ratelimit.redis_guard import CEILING_SECONDS


@pytest.mark.parametrize(
    ("url", "seeds", "username", "password"),
    [
        ("redis+cluster://10.0.0.1:7000", [("10.0.0.1", 7000)], None, None),
        (
            "redis+cluster://a:7000,b:7001,c:7002/",
            [("a", 7000), ("b", 7001), ("c", 7002)],
            None,
            None,
        ),
        ("rediss+cluster://:s%40cret@h:1", [("h", 1)], None, "s@cret"),
        ("redis+cluster://user:pw@h:1/0", [("h", 1)], "user", "pw"),
        ("redis+cluster://[::1]:7000,[::1]:7001", [("::1", 7000), ("::1", 7001)], None, None),
    ],
)
def test_parse_cluster_url(
    url: str, seeds: list[tuple[str, int]], username: str | None, password: str | None
) -> None:
    assert parse_cluster_url(url) == (seeds, username, password)


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://",
        "redis+cluster://host",
        "redis+cluster://host:notaport",
        "redis+cluster://host:70000",
        "redis+cluster://[::1]7000",
        "redis+cluster://h:1/2",
        "redis+cluster://h:1?ssl=true",
    ],
)
def test_parse_cluster_url_rejects(url: str) -> None:
    with pytest.raises(ValueError, match=r"(?i)cluster"):
        parse_cluster_url(url)


async def test_connect_standalone_sets_timeouts_and_a_bounded_pool() -> None:
    client = connect_redis("redis://127.0.0.1:1/3", timeout_seconds=0.05, max_connections=7)
    try:
        assert isinstance(client, Redis)
        kwargs = client.connection_pool.connection_kwargs
        # The limiter's guard enforces the 50 ms (net of loop lag); the sockets only back it
        # up at the guard's wall-clock ceiling.
        assert kwargs["socket_timeout"] == CEILING_SECONDS
        assert kwargs["socket_connect_timeout"] == CEILING_SECONDS
        assert kwargs["db"] == 3
        assert client.connection_pool.max_connections == 7
    finally:
        await client.aclose()


async def test_connect_rediss_uses_tls() -> None:
    client = connect_redis("rediss://:pw@redis.example:6380/0", timeout_seconds=0.05)
    try:
        assert isinstance(client, Redis)
        assert client.connection_pool.connection_class is SSLConnection
        assert client.connection_pool.connection_kwargs["password"] == "pw"
    finally:
        await client.aclose()


async def test_connect_cluster() -> None:
    client = connect_redis("rediss+cluster://h1:7000,h2:7001", timeout_seconds=0.05)
    try:
        assert isinstance(client, RedisCluster)
    finally:
        await client.aclose()


def test_connect_rejects_unknown_schemes() -> None:
    with pytest.raises(ValueError, match="unsupported Redis URL scheme 'http'"):
        connect_redis("http://localhost", timeout_seconds=0.05)


def test_both_keys_share_one_hash_tag() -> None:
    requests, tokens = bucket_keys("ws_123")
    assert requests != tokens
    assert "{ws:ws_123}" in requests
    assert "{ws:ws_123}" in tokens
