"""The Redis rate limiter: one Lua script call per request, shared by every sidecar replica.

Every operation is one EVALSHA of its own script (`ratelimit.lua_scripts`): `acquire` (the
buckets), `acquire_quota` (the monthly quota read from the usage counters, then the buckets),
`adjust` (`adjust_tokens`), `record` (`record_usage`: TPM delta and counter increments together)
and `seed` (`seed_usage`: set-if-absent counters). On standalone Redis the calls made in one
event-loop tick share one pipelined write (`ratelimit.pipeline`); on a cluster they go one by one
to their slot's master, redirects and slot migrations handled by `ratelimit.redis_cluster`.

Redis URL forms understood by `connect_redis`:

* `redis://[[user]:password@]host[:port][/db][?option=value...]` - one Redis server;
* `rediss://...` - the same over TLS;
* `unix:///path/to/redis.sock[?db=N]` - one Redis server on a Unix socket;
* `redis+cluster://[[user]:password@]host:port[,host:port...]` - Redis Cluster, given one or
  more seed nodes (the rest are discovered); `rediss+cluster://...` for TLS. IPv6 hosts go in
  brackets: `redis+cluster://[::1]:7000,[::1]:7001`. A cluster has only db 0, and takes no
  query options.

Options in a `redis://` query string (e.g. `?socket_timeout=0.1`) override the defaults set here.

Failure handling (`ratelimit.redis_guard`): every call is bounded in time and in number in
flight, and any exception from the client becomes `RateLimitUnavailable`, counted by kind. A
circuit breaker refuses calls at once while Redis is down and lets one probe through per
cool-down, so a dead Redis costs microseconds and a returning one is used again within about
the cool-down.

Retries: redis-py's own are off. The guard retries a call once, at once, after a *connection*
error, never after a timeout: pooled connections to a Redis that restarted (or closed them when
idle) each fail on first use, and without the retry every such connection would cost a request
and push the breaker open. If a connection drops after a script ran but before its reply
arrived, the retry runs it again: for `acquire` that debits the request twice (rare, and on the
safe side); `adjust` and `record` carry an operation id that their script remembers for a
minute, so their retry is applied once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ratelimit import bucket
from ratelimit import quota as quotas
from ratelimit.breaker import CircuitBreaker
from ratelimit.keys import bucket_keys, operations_key, touched_bucket_keys, usage_keys
from ratelimit.limiter import (
    LimitResult,
    Limits,
    Quota,
    QuotaState,
    RateLimitUnavailable,
    UsageTag,
)
from ratelimit.lua_scripts import Operation, script_text
from ratelimit.metrics import RateLimitMetrics
from ratelimit.pipeline import ScriptPipeliner
from ratelimit.redis_cluster import (
    TRYAGAIN_SHARE,
    ClusterScript,
    ClusterScripts,
    parse_cluster_url,
)
from ratelimit.redis_guard import CEILING_SECONDS, RedisGuard
from ratelimit.redis_marks import OPERATION_TTL_SECONDS as OPERATION_TTL_SECONDS
from ratelimit.redis_marks import LedgerMarkCalls, operation_arg
from ratelimit.redis_nodes import STANDALONE, UNMAPPED, NodeBreakers

_log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_SECONDS = 0.05
DEFAULT_MAX_CONNECTIONS = 32
"""Per Redis node. One EVALSHA takes well under a millisecond, so few connections carry a lot."""

_STANDALONE_SCHEMES = ("redis", "rediss", "unix")
_CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}

RedisClient = Redis | RedisCluster


def _cluster_ok(info: Any) -> bool:
    """Whether a CLUSTER INFO reply (parsed by redis-py into a dict) says cluster_state:ok."""
    return isinstance(info, dict) and info.get("cluster_state") == "ok"


def _ints(reply: Sequence[Any]) -> tuple[int, ...]:
    return tuple(int(value) for value in reply)


def connect_redis(
    url: str, *, timeout_seconds: float, max_connections: int = DEFAULT_MAX_CONNECTIONS
) -> RedisClient:
    """A client for `url` (see the module docstring) with bounded pools, timeouts and no retries.

    Nothing is connected yet: connections open on first use. Raises ValueError for a URL it
    cannot understand.
    """
    scheme = url.partition("://")[0].lower()
    no_retry = Retry(NoBackoff(), 0)
    backstop = max(timeout_seconds, CEILING_SECONDS)
    if scheme in _STANDALONE_SCHEMES:
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            # The limiter's guard enforces the real, lag-aware budget; these socket and pool
            # timeouts are only a backstop at the guard's wall-clock ceiling.
            timeout=backstop,
            socket_timeout=backstop,
            socket_connect_timeout=backstop,
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
            socket_timeout=backstop,
            socket_connect_timeout=backstop,
            retry=no_retry,
            # A MOVED only patches the slot map: by default every fifth one closes the whole
            # client, failing every call in flight on every master.
            reinitialize_steps=0,
        )
    raise ValueError(
        f"unsupported Redis URL scheme {scheme!r}: "
        "use redis://, rediss://, unix://, redis+cluster:// or rediss+cluster://"
    )


class RedisRateLimiter(LedgerMarkCalls):
    """`RateLimiter` on Redis (standalone or Cluster), one atomic Lua script call per operation."""

    def __init__(
        self,
        client: RedisClient,
        *,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        breaker: CircuitBreaker | None = None,
        metrics: RateLimitMetrics | None = None,
        max_in_flight: int = DEFAULT_MAX_CONNECTIONS,
        pipelining: bool = True,
    ) -> None:
        """`max_in_flight` bounds concurrent Redis calls; the rest queue (see redis_guard).
        `pipelining` coalesces one loop tick's script calls into one round trip
        (`ratelimit.pipeline`); standalone Redis only, a cluster is called one by one."""
        self._client = client
        self._metrics = metrics
        self._breaker = breaker or CircuitBreaker()
        self._nodes = NodeBreakers(client, self._breaker)
        self._guard = RedisGuard(
            timeout_seconds=timeout_seconds,
            max_in_flight=max_in_flight,
            metrics=metrics,
            logger=_log,
            describe=self._nodes.describe,
        )
        self._pipeliner = (
            ScriptPipeliner(client) if pipelining and isinstance(client, Redis) else None
        )
        # register_script gives EVALSHA with a SCRIPT LOAD fallback on NOSCRIPT.
        self._scripts = {op: client.register_script(self._script_text(op)) for op in Operation}
        self._cluster: ClusterScripts | None = None
        self._cluster_scripts: dict[Operation, ClusterScript] = {}
        if isinstance(client, RedisCluster):
            self._cluster = ClusterScripts(
                client, tryagain_seconds=TRYAGAIN_SHARE * timeout_seconds
            )
            self._cluster_scripts = {
                op: ClusterScript.of(self._script_text(op)) for op in Operation
            }

    def _script_text(self, operation: Operation) -> str:
        """The script sent for `operation` (a test subclass swaps the clock)."""
        return script_text(operation)

    def _clock_args(self) -> list[int]:
        """Arguments appended after each script's own (none: the scripts read Redis' TIME)."""
        return []

    @property
    def breaker(self) -> CircuitBreaker:
        """The circuit breaker guarding a standalone Redis (on a cluster: the prototype of the
        per-node breakers, see `node_breaker`)."""
        return self._breaker

    def node_breaker(self, workspace_id: str) -> CircuitBreaker:
        """The breaker of the node that serves `workspace_id` now."""
        return self._nodes.breaker(self._nodes.node_for(bucket_keys(workspace_id)[0]))

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
        buckets = touched_bucket_keys(workspace_id, rpm=limits.rpm, tpm=limits.tpm)
        if quota is None:
            reply = await self._run(Operation.ACQUIRE, buckets, [limits.rpm, limits.tpm, cost])
            return bucket.LimitDecision.from_wire(_ints(reply), limits).to_result()
        quota = quotas.normalise_quota(quota)
        reply = await self._run(
            Operation.ACQUIRE_QUOTA,
            (*buckets, *usage_keys(workspace_id, quota.period)),
            [
                limits.rpm,
                limits.tpm,
                cost,
                quotas.normalise_amount(tokens, "token cost"),
                spend,
                quotas.to_wire_limit(quota.token_quota),
                quotas.to_wire_limit(quota.spend_cap_micros),
            ],
        )
        decision = bucket.LimitDecision.from_wire(_ints(reply), limits, period=quota.period)
        return decision.to_result()

    async def adjust_tokens(self, workspace_id: str, limits: Limits, delta: int) -> None:
        """Charge (delta > 0) or refund (delta < 0) tokens; raises RateLimitUnavailable.
        Applied once even when a lost reply makes the guard retry it."""
        limits = bucket.normalise_limits(limits)
        if not limits.tpm or not delta:
            return
        await self._run(
            Operation.ADJUST,
            (bucket_keys(workspace_id)[1], operations_key(workspace_id)),
            [
                limits.tpm,
                bucket.normalise_delta(delta, limits.tpm),
                OPERATION_TTL_SECONDS,
                operation_arg(None),
            ],
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
        operation_id: str | None = None,
        tag: UsageTag | None = None,
    ) -> QuotaState:
        """In one EVALSHA: adjust the TPM bucket by `tpm_delta` (as `adjust_tokens`), INCRBY the
        period's counters and restart their TTLs. Returns the counters after the increment;
        `known` says whether both existed before it. Raises RateLimitUnavailable.

        Applied once per call, even when a lost reply makes the guard retry it, and once per
        `operation_id` when the caller retries the call itself. With a `tag`: the
        `record_month` script instead (`ratelimit.marks`).
        """
        quotas.validate_period(period)
        if tag is not None:
            amounts = (tpm_delta, tokens, spend_micros)
            return await self._record_month(
                workspace_id, limits, period, amounts, operation_id, tag
            )
        limits = bucket.normalise_limits(limits)
        delta = bucket.normalise_delta(tpm_delta, limits.tpm)
        counters = usage_keys(workspace_id, period)
        # The token bucket is named only when the script touches it (see touched_bucket_keys).
        tokens_key = bucket_keys(workspace_id)[1] if limits.tpm and delta else counters[0]
        reply = await self._run(
            Operation.RECORD,
            (tokens_key, *counters, operations_key(workspace_id)),
            [
                limits.tpm,
                delta,
                quotas.normalise_amount(tokens, "tokens"),
                quotas.normalise_amount(spend_micros, "spend"),
                quotas.COUNTER_TTL_SECONDS,
                OPERATION_TTL_SECONDS,
                operation_arg(operation_id),
            ],
        )
        return quotas.state_from_wire(period, *_ints(reply))

    async def seed_usage(
        self, workspace_id: str, *, period: str, tokens: int, spend_micros: int
    ) -> None:
        """Set each of the period's counters only if absent (SET NX EX), in one EVALSHA;
        raises RateLimitUnavailable."""
        quotas.validate_period(period)
        await self._run(
            Operation.SEED,
            usage_keys(workspace_id, period),
            [
                quotas.normalise_amount(tokens, "tokens"),
                quotas.normalise_amount(spend_micros, "spend"),
                quotas.COUNTER_TTL_SECONDS,
            ],
        )

    async def ping(self) -> bool:
        """Readiness. Standalone: Redis answers PING in time. Cluster: redis-py has a slot map,
        and every master in it answers CLUSTER INFO in time with cluster_state:ok. Outcomes feed
        the nodes' breakers."""
        if not isinstance(self._client, RedisCluster):
            return await self._answers(STANDALONE, self._client.ping)
        cluster = self._client
        assert self._cluster is not None
        if not await self._answers(UNMAPPED, self._cluster.refresh):
            return False
        masters = cluster.get_primaries()
        checks = [
            self._answers(node.name, partial(cluster.cluster_info, target_nodes=node), _cluster_ok)
            for node in masters
        ]
        return bool(masters) and all(await asyncio.gather(*checks))

    async def _answers(
        self,
        node: str,
        call: Callable[[], Awaitable[Any]],
        healthy: Callable[[Any], bool] = lambda _: True,
    ) -> bool:
        try:
            return healthy(await self._guarded("ping", node, call))
        except RateLimitUnavailable:
            return False

    async def close(self) -> None:
        """Close the client and its connection pools."""
        self._guard.close()
        if self._pipeliner is not None:
            await self._pipeliner.close()
        await self._client.aclose()

    async def _run(
        self, operation: Operation, keys: Sequence[str], args: Sequence[int | str]
    ) -> Any:
        """One script call with the operation's fixed ARGV, on the node that owns its slot."""
        argv = [*args, *self._clock_args()]
        script = self._scripts[operation]
        if self._cluster is not None:
            cluster, on_cluster = self._cluster, self._cluster_scripts[operation]
            if not cluster.has_slot_map:
                await self._guarded("topology", UNMAPPED, cluster.refresh)
            return await self._guarded(
                operation,
                self._nodes.node_for(keys[0]),
                lambda: cluster.evalsha(on_cluster, keys, argv),
            )
        node = self._nodes.node_for(keys[0])
        pipeliner = self._pipeliner
        if pipeliner is not None:
            return await self._guarded(
                operation, node, lambda: pipeliner.evalsha(script, keys, argv)
            )
        return await self._guarded(operation, node, lambda: script(keys=keys, args=argv))

    async def _guarded(self, operation: str, node: str, call: Callable[[], Awaitable[Any]]) -> Any:
        try:
            return await self._guard.call(operation, self._nodes.breaker(node), node, call)
        finally:
            # Read after every call rather than hooked into the breakers, so the gauge is right
            # whoever built the prototype breaker. On a cluster it shows the most open circuit.
            if self._metrics is not None:
                self._metrics.set_circuit_state(self._nodes.worst_state())
