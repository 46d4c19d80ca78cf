"""Every Redis call of the limiter goes through `RedisGuard.call`: bounded, contained, counted.

* **Bounded.** At most `max_in_flight` calls are in flight; the rest queue. The Redis budget
  (`timeout_seconds`) starts when a call leaves the queue, is counted net of event-loop lag, and
  is extended while the node keeps answering other calls (`ratelimit.loop_lag`), so a busy
  process does not mistake its own slowness for a dead Redis.
  A wall-clock ceiling (queueing included) still bounds every call.
* **Contained.** Whatever the client raises becomes `RateLimitUnavailable`, counted by kind:
  Redis' own errors and any other exception (redis-py's cluster client can raise
  `RuntimeError` or `AttributeError` when it closes itself under a call in flight). Only
  cancellation passes through.
* **Breakers.** A timeout, connection failure, error reply or client exception counts against
  the circuit breaker of the node the call went to; an overloaded process (the ceiling passed
  while Redis' own budget had not) counts against none, nor does a slot migration that a call
  could not wait out (TRYAGAIN, redirects: the node answered).
* **Retries.** One immediate retry after a connection error (a pooled connection to a Redis that
  restarted fails on first use), or after the AttributeError/RuntimeError of a connection that
  redis-py's cluster client closed under the call. Never after a timeout. The caller makes its
  scripts safe to run twice (see redis_backend).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.exceptions import AskError, RedisClusterException, RedisError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ratelimit.breaker import CircuitBreaker
from ratelimit.limiter import RateLimitUnavailable
from ratelimit.loop_lag import LoopLag, NetDeadline
from ratelimit.metrics import RateLimitMetrics, RedisErrorKind

T = TypeVar("T")

CEILING_SECONDS = 2.5
"""Wall-clock bound on one call, queueing and loop lag included. Deliberately past Envoy's
ext_authz timeout (2 s in the shipped configs): Envoy's gRPC deadline cancels a Check it has
given up on (and its limiter call with it), so failing sooner would only turn slow successes
into 503s; this bounds callers without a deadline. A Redis that does not answer fails at
`timeout_seconds` (net of lag)."""

LOG_INTERVAL_SECONDS = 10.0
"""At most one warning per node and kind in this interval; the rest are counted in metrics."""


class RedisGuard:
    """Timeouts, bounded concurrency, error translation, breakers and metrics for Redis calls."""

    def __init__(
        self,
        *,
        timeout_seconds: float,
        max_in_flight: int,
        metrics: RateLimitMetrics | None,
        logger: logging.Logger,
        ceiling_seconds: float = CEILING_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        describe: Callable[[str], str] = str,
    ) -> None:
        """`describe(node)` names a node in log lines (e.g. with its slot ranges)."""
        self._timeout = timeout_seconds
        self._ceiling = max(ceiling_seconds, timeout_seconds)
        self._slots = asyncio.Semaphore(max_in_flight)
        self._metrics = metrics
        self._lag = LoopLag()
        self._log = logger
        self._clock = clock
        self._describe = describe
        self._last_logged: dict[tuple[str, str], float] = {}
        self._answered: dict[str, float] = {}
        """Loop time of each node's latest answer: a node that answers is not timing out."""

    async def call(
        self,
        operation: str,
        breaker: CircuitBreaker,
        node: str,
        call: Callable[[], Awaitable[T]],
    ) -> T:
        """Run `call` for `operation` on `node`, guarded by that node's `breaker`."""
        if not breaker.allow():
            self._count(RedisErrorKind.CIRCUIT_OPEN)
            raise RateLimitUnavailable(f"Redis circuit is open for {node}: recent calls failed")
        started = time.perf_counter()
        deadline: NetDeadline | None = None
        try:
            async with asyncio.timeout(self._ceiling) as timeout, self._slots:
                deadline = NetDeadline(
                    timeout,
                    self._lag,
                    budget=self._timeout,
                    answered_since=lambda t: self._answered.get(node, -1.0) > t,
                )
                try:
                    result = await self._attempts(call)
                finally:
                    deadline.cancel()
        except (TimeoutError, RedisTimeoutError) as exc:
            # Redis is blamed only when its own, lag-free budget ran out.
            expired = deadline is not None and (deadline.expired or isinstance(exc, RedisError))
            kind = RedisErrorKind.TIMEOUT if expired else RedisErrorKind.OVERLOAD
            raise self._failed(kind, operation, breaker, node, exc) from exc
        except (RedisConnectionError, ConnectionError) as exc:
            raise self._failed(RedisErrorKind.CONNECTION, operation, breaker, node, exc) from exc
        except (TryAgainError, AskError) as exc:
            # A slot migration still in progress (or redirects that ran out): the node answered,
            # so its breaker is not charged; the call fails alone.
            raise self._failed(RedisErrorKind.OTHER, operation, None, node, exc) from exc
        except (RedisError, RedisClusterException, OSError) as exc:
            raise self._failed(RedisErrorKind.OTHER, operation, breaker, node, exc) from exc
        except Exception as exc:
            raise self._failed(RedisErrorKind.CLIENT, operation, breaker, node, exc) from exc
        finally:
            if self._metrics is not None:
                self._metrics.observe_latency(operation, time.perf_counter() - started)
        self._answered[node] = asyncio.get_running_loop().time()
        breaker.record_success()
        return result

    def close(self) -> None:
        """Stop the lag ticker."""
        self._lag.stop()

    async def _attempts(self, call: Callable[[], Awaitable[T]]) -> T:
        try:
            return await call()
        except (RedisTimeoutError, RedisClusterException):
            raise
        except (RedisConnectionError, AttributeError, RuntimeError):
            # A connection that broke (redis-py has dropped it), or one a cluster client closed
            # under us: the retry gets a fresh one.
            return await call()

    def _failed(
        self,
        kind: RedisErrorKind,
        operation: str,
        breaker: CircuitBreaker | None,
        node: str,
        exc: BaseException,
    ) -> RateLimitUnavailable:
        if breaker is not None and kind is not RedisErrorKind.OVERLOAD:
            breaker.record_failure()
        self._count(kind)
        message = f"Redis {operation} on {node} failed ({kind.value}): {exc!r}"
        self._warn(node, kind, operation, exc)
        return RateLimitUnavailable(message)

    def _warn(self, node: str, kind: RedisErrorKind, operation: str, exc: BaseException) -> None:
        """One warning per node and kind per LOG_INTERVAL_SECONDS; metrics count every one."""
        now = self._clock()
        last = self._last_logged.get((node, kind.value))
        if last is not None and now - last < LOG_INTERVAL_SECONDS:
            return
        self._last_logged[(node, kind.value)] = now
        message = f"Redis {operation} on {self._describe(node)} failed ({kind.value}): {exc!r}"
        exc_info = kind is RedisErrorKind.CLIENT
        self._log.warning(
            "%s (further ones for %.0f s in metrics only)",
            message,
            LOG_INTERVAL_SECONDS,
            exc_info=exc_info,
        )

    def _count(self, kind: RedisErrorKind) -> None:
        if self._metrics is not None:
            self._metrics.count_error(kind)
