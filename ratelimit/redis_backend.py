"""The Redis rate limiter: one Lua script call per request, shared by every sidecar replica.

Every operation is one EVALSHA of `buckets.lua`: `acquire` (buckets, plus the monthly quota read
from the usage counters when a `Quota` is given), `adjust_tokens`, `record_usage` (TPM delta and
counter increments together) and `seed_usage` (set-if-absent counters).

Redis URL forms understood by `connect_redis`:

* `redis://[[user]:password@]host[:port][/db][?option=value...]` - one Redis server;
* `rediss://...` - the same over TLS;
* `unix:///path/to/redis.sock[?db=N]` - one Redis server on a Unix socket;
* `redis+cluster://[[user]:password@]host:port[,host:port...]` - Redis Cluster, given one or
  more seed nodes (the rest are discovered); `rediss+cluster://...` for TLS. IPv6 hosts go in
  brackets: `redis+cluster://[::1]:7000,[::1]:7001`. A cluster has only db 0, and takes no
  query options.

Options in a `redis://` query string (e.g. `?socket_timeout=0.1`) override the defaults set here.

Failure handling: every call is bounded by `timeout_seconds` (the socket timeout and an
`asyncio.timeout` around the whole call, connection set-up and NOSCRIPT fallback included);
any Redis error becomes `RateLimitUnavailable`, counted by kind. A circuit breaker refuses calls
at once while Redis is down and lets one probe through per cool-down, so a dead Redis costs
microseconds and a returning one is used again within about the cool-down.

Retries: redis-py's own are off. The limiter retries a call once, at once, after a *connection*
error, never after a timeout: pooled connections to a Redis that restarted (or closed them when
idle) each fail on first use, and without the retry every such connection would cost a request
and push the breaker open. The price is rare and on the safe side: if a connection drops after
the script ran but before its reply arrived, the retry debits that request twice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any
from urllib.parse import unquote

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ratelimit import bucket
from ratelimit import quota as quotas
from ratelimit.breaker import CircuitBreaker
from ratelimit.keys import bucket_keys, script_keys
from ratelimit.limiter import LimitResult, Limits, Quota, QuotaState, RateLimitUnavailable
from ratelimit.metrics import RateLimitMetrics, RedisErrorKind

SCRIPT_RESOURCE = "buckets.lua"
DEFAULT_TIMEOUT_SECONDS = 0.05
DEFAULT_MAX_CONNECTIONS = 32
"""Per Redis node. One EVALSHA takes well under a millisecond, so few connections carry a lot."""

_STANDALONE_SCHEMES = ("redis", "rediss", "unix")
_CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}

RedisClient = Redis | RedisCluster


def _ints(reply: Sequence[Any]) -> tuple[int, ...]:
    return tuple(int(value) for value in reply)


def load_script_text() -> str:
    """The bucket script shipped as package data."""
    return resources.files("ratelimit").joinpath(SCRIPT_RESOURCE).read_text(encoding="utf-8")


def connect_redis(
    url: str, *, timeout_seconds: float, max_connections: int = DEFAULT_MAX_CONNECTIONS
) -> RedisClient:
    """A client for `url` (see the module docstring) with bounded pools, timeouts and no retries.

    Nothing is connected yet: connections open on first use. Raises ValueError for a URL it
    cannot understand.
    """
    scheme = url.partition("://")[0].lower()
    no_retry = Retry(NoBackoff(), 0)
    if scheme in _STANDALONE_SCHEMES:
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            # Waiting for a free connection counts against the same budget as the call.
            timeout=timeout_seconds,
            socket_timeout=timeout_seconds,
            socket_connect_timeout=timeout_seconds,
            retry=no_retry,
        )
        return Redis.from_pool(pool)
    if scheme in _CLUSTER_SCHEMES:
        seeds, username, password = parse_cluster_url(url)
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in seeds],
            username=username,
            password=password,
            ssl=_CLUSTER_SCHEMES[scheme],
            max_connections=max_connections,
            socket_timeout=timeout_seconds,
            socket_connect_timeout=timeout_seconds,
            retry=no_retry,
        )
    raise ValueError(
        f"unsupported Redis URL scheme {scheme!r}: "
        "use redis://, rediss://, unix://, redis+cluster:// or rediss+cluster://"
    )


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], str | None, str | None]:
    """Split a `redis+cluster://` URL into seed (host, port) pairs, username and password."""
    rest = url.partition("://")[2]
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    netloc, tail = rest[:cut], rest[cut:]
    if tail not in ("", "/", "/0"):
        raise ValueError(f"a Redis Cluster URL takes no path or options, got {tail!r}")
    userinfo, at, hostlist = netloc.rpartition("@")
    username: str | None = None
    password: str | None = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    seeds = [_parse_host_port(item) for item in hostlist.split(",") if item]
    if not seeds:
        raise ValueError("a Redis Cluster URL needs at least one host:port")
    return seeds, username, password


def _parse_host_port(item: str) -> tuple[str, int]:
    if item.startswith("["):
        host, bracket, port_text = item[1:].partition("]")
        if not bracket or not port_text.startswith(":"):
            raise ValueError(f"bad cluster node {item!r}: expected [ipv6]:port")
        port_text = port_text[1:]
    else:
        host, colon, port_text = item.rpartition(":")
        if not colon:
            raise ValueError(f"bad cluster node {item!r}: expected host:port")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad cluster node {item!r}: expected host:port")
    return host, int(port_text)


class RedisRateLimiter:
    """`RateLimiter` on Redis (standalone or Cluster) through one atomic Lua script."""

    def __init__(
        self,
        client: RedisClient,
        *,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        breaker: CircuitBreaker | None = None,
        metrics: RateLimitMetrics | None = None,
        test_clock_ms: Callable[[], int] | None = None,
    ) -> None:
        """`test_clock_ms` is for tests only: it replaces Redis' TIME as the buckets' clock."""
        self._client = client
        self._timeout = timeout_seconds
        self._metrics = metrics
        self._breaker = breaker or CircuitBreaker()
        self._test_clock_ms = test_clock_ms
        # register_script gives EVALSHA with a SCRIPT LOAD fallback on NOSCRIPT.
        self._script = client.register_script(load_script_text())

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        metrics: RateLimitMetrics | None = None,
    ) -> RedisRateLimiter:
        """A limiter with its own client from `connect_redis`."""
        client = connect_redis(url, timeout_seconds=timeout_seconds)
        return cls(client, timeout_seconds=timeout_seconds, metrics=metrics)

    @property
    def breaker(self) -> CircuitBreaker:
        """The circuit breaker guarding this limiter's Redis."""
        return self._breaker

    async def acquire(
        self,
        workspace_id: str,
        limits: Limits,
        tokens: int,
        *,
        quota: Quota | None = None,
        spend_micros: int = 0,
    ) -> LimitResult:
        """Check the quota (if given) and take one request and `tokens` tokens, in one EVALSHA;
        the usage counters are only read. Raises RateLimitUnavailable."""
        limits = bucket.normalise_limits(limits)
        cost = bucket.normalise_cost(tokens)
        spend = quotas.normalise_amount(spend_micros, "spend")
        if quota is None:
            reply = await self._run(
                "acquire", bucket_keys(workspace_id), [limits.rpm, limits.tpm, cost]
            )
            return bucket.Decision.from_wire(_ints(reply), limits).to_result()
        quota = quotas.normalise_quota(quota)
        reply = await self._run(
            "acquire_quota",
            script_keys(workspace_id, quota.period),
            [limits.rpm, limits.tpm, cost],
            usage=[
                quotas.normalise_amount(tokens, "token cost"),
                spend,
                quotas.to_wire_limit(quota.token_quota),
                quotas.to_wire_limit(quota.spend_cap_micros),
            ],
        )
        decision = bucket.Decision.from_wire(_ints(reply), limits, period=quota.period)
        return decision.to_result()

    async def adjust_tokens(self, workspace_id: str, limits: Limits, delta: int) -> None:
        """Charge (delta > 0) or refund (delta < 0) tokens; raises RateLimitUnavailable."""
        limits = bucket.normalise_limits(limits)
        if not limits.tpm or not delta:
            return
        await self._run(
            "adjust",
            bucket_keys(workspace_id),
            [limits.rpm, limits.tpm, bucket.normalise_delta(delta, limits.tpm)],
        )

    async def record_usage(
        self,
        workspace_id: str,
        limits: Limits,
        *,
        period: str,
        tpm_delta: int,
        tokens: int,
        spend_micros: int,
    ) -> QuotaState:
        """In one EVALSHA: adjust the TPM bucket by `tpm_delta` (as `adjust_tokens`), INCRBY the
        period's counters and restart their TTLs. Returns the counters after the increment;
        `known` says whether both existed before it. Raises RateLimitUnavailable.

        Not idempotent: a retried call (see the module docstring) or a repeated report counts
        twice, so the caller dedupes usage reports.
        """
        quotas.validate_period(period)
        limits = bucket.normalise_limits(limits)
        reply = await self._run(
            "record",
            script_keys(workspace_id, period),
            [limits.rpm, limits.tpm, bucket.normalise_delta(tpm_delta, limits.tpm)],
            usage=[
                quotas.normalise_amount(tokens, "tokens"),
                quotas.normalise_amount(spend_micros, "spend"),
                quotas.COUNTER_TTL_SECONDS,
            ],
        )
        tokens_used, spend_used, known = _ints(reply)
        return QuotaState(
            period=period,
            tokens_used=tokens_used,
            spend_used_micros=spend_used,
            known=bool(known),
        )

    async def seed_usage(
        self, workspace_id: str, *, period: str, tokens: int, spend_micros: int
    ) -> None:
        """Set each of the period's counters only if absent (SET NX EX), in one EVALSHA;
        raises RateLimitUnavailable."""
        quotas.validate_period(period)
        await self._run(
            "seed",
            script_keys(workspace_id, period),
            [0, 0, 0],
            usage=[
                quotas.normalise_amount(tokens, "tokens"),
                quotas.normalise_amount(spend_micros, "spend"),
                quotas.COUNTER_TTL_SECONDS,
            ],
        )

    async def ping(self) -> bool:
        """True when Redis answers PING in time; the outcome also feeds the breaker."""
        try:
            await self._guarded("ping", self._client.ping)
        except RateLimitUnavailable:
            return False
        return True

    async def close(self) -> None:
        """Close the client and its connection pools."""
        await self._client.aclose()

    async def _run(
        self,
        mode: str,
        keys: Sequence[str],
        numbers: Sequence[int],
        *,
        usage: Sequence[int] = (),
    ) -> Any:
        """One script call: ARGV is mode, `numbers` (rpm, tpm, amount), now, then `usage`."""
        args: list[str | int] = [mode, *numbers]
        if self._test_clock_ms is not None:
            args.append(self._test_clock_ms())
        elif usage:
            args.append("")  # no "now" override, but the usage arguments follow it
        args.extend(usage)
        allowed = self._breaker.allow()
        self._export_state()
        if not allowed:
            self._count(RedisErrorKind.CIRCUIT_OPEN)
            raise RateLimitUnavailable("Redis circuit is open: recent calls failed")
        return await self._guarded(mode, lambda: self._script(keys=keys, args=args))

    async def _guarded(self, operation: str, call: Callable[[], Any]) -> Any:
        """Run one Redis call under the timeout, translating failures and feeding the breaker."""
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout):
                try:
                    result = await call()
                except RedisConnectionError:
                    # redis-py has dropped the broken connection; the retry gets a fresh one.
                    result = await call()
        except (TimeoutError, RedisTimeoutError) as exc:
            raise self._failed(RedisErrorKind.TIMEOUT, operation, exc) from exc
        except (RedisConnectionError, ConnectionError) as exc:
            raise self._failed(RedisErrorKind.CONNECTION, operation, exc) from exc
        except (RedisError, RedisClusterException, OSError) as exc:
            raise self._failed(RedisErrorKind.OTHER, operation, exc) from exc
        finally:
            if self._metrics is not None:
                self._metrics.observe_latency(operation, time.perf_counter() - started)
        self._breaker.record_success()
        self._export_state()
        return result

    def _failed(
        self, kind: RedisErrorKind, operation: str, exc: BaseException
    ) -> RateLimitUnavailable:
        self._breaker.record_failure()
        self._export_state()
        self._count(kind)
        return RateLimitUnavailable(f"Redis {operation} failed ({kind.value}): {exc!r}")

    def _export_state(self) -> None:
        # Read after every breaker step rather than hooked into the breaker, so the gauge is
        # right whoever built the breaker.
        if self._metrics is not None:
            self._metrics.set_circuit_state(self._breaker.state)

    def _count(self, kind: RedisErrorKind) -> None:
        if self._metrics is not None:
            self._metrics.count_error(kind)
