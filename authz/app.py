"""The composition root: the one place that builds settings, pools, scripts and servers.

Everything else receives its collaborators through constructors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Coroutine
from typing import Any

import grpc
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]  # old stubs
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from authz.api.gen import console_pb2, console_pb2_grpc, keys_pb2, keys_pb2_grpc
from authz.check import AuthorizationServicer
from authz.console.service import ConsoleServicer
from authz.fanout import FanOut
from authz.health import AUTHZ_SERVICE, Readiness
from authz.identity import IdentityVerifier
from authz.keyservice import KeyServicer
from authz.lastused import LastUsedRecorder
from authz.logs import configure_logging
from authz.metrics import Metrics
from authz.resolver import KeyResolver
from authz.responses import AllowRenderer
from authz.settings import Settings, SettingsError, redact_url
from authz.store import open_store
from authz.usage.accesslog import AccessLogServicer
from authz.usage.accountant import UsageAccountant
from authz.usage.pricing import PriceTable
from authz.usage.seeding import QuotaSeeder
from ratelimit.breaker import CircuitBreaker
from ratelimit.limiter import RateLimiter
from ratelimit.memory import InMemoryRateLimiter
from ratelimit.redis_backend import RedisRateLimiter, connect_redis

log = logging.getLogger("authz")


class StartupError(Exception):
    """The sidecar cannot start; the message says why in one line."""


def build_limiter(settings: Settings, metrics: Metrics) -> RateLimiter:
    if settings.redis_url is None:
        return InMemoryRateLimiter()
    timeout = settings.redis_timeout_ms / 1000
    try:
        client = connect_redis(settings.redis_url, timeout_seconds=timeout)
    except ValueError as error:
        raise SettingsError("AUTHZ_REDIS_URL", str(error)) from None
    breaker = CircuitBreaker(
        failure_threshold=settings.redis_breaker_failures,
        cooldown_seconds=settings.redis_breaker_cooldown_ms / 1000,
    )
    return RedisRateLimiter(
        client, timeout_seconds=timeout, breaker=breaker, metrics=metrics.limiter
    )


def _split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


async def serve(settings: Settings) -> int:
    """Run the sidecar until SIGTERM/SIGINT, then drain and return the exit code."""
    metrics = Metrics(CollectorRegistry(), workspace_label=settings.metrics_workspace_label)
    store = await open_store(settings.database_url, **settings.store_options())
    limiter = build_limiter(settings, metrics)
    resolver = KeyResolver(
        store,
        metrics,
        size=settings.cache_size,
        ttl=settings.cache_ttl_s,
        negative_size=settings.negative_cache_size,
        negative_ttl=settings.negative_cache_ttl_s,
        stale_if_error=settings.stale_if_error_s,
    )
    last_used = LastUsedRecorder(store, interval=settings.last_used_flush_s)
    prices = PriceTable()
    accountant = UsageAccountant(
        store=store,
        limiter=limiter,
        resolver=resolver,
        prices=prices,
        metrics=metrics,
        flush_interval=settings.ledger_flush_s,
    )
    authorization = AuthorizationServicer(
        resolver=resolver,
        limiter=limiter,
        metrics=metrics,
        renderer=AllowRenderer(keep_authorization=settings.keep_authorization),
        last_used=last_used,
        prices=prices,
        seeder=QuotaSeeder(store, limiter),
        fail_open=settings.failure_mode == "open",
    )
    health = health_aio.HealthServicer()
    readiness = Readiness(
        health,
        store=store,
        limiter=limiter,
        metrics=metrics,
        limiter_required=settings.redis_url is not None and settings.failure_mode == "closed",
        interval=settings.health_interval_s,
    )
    await health.set(AUTHZ_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(authorization, server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(AccessLogServicer(accountant), server)
    verifier = IdentityVerifier(
        settings.jwt_issuers, jwks_timeout_s=settings.jwks_timeout_ms / 1000
    )
    keys_pb2_grpc.add_KeyServiceServicer_to_server(
        KeyServicer(store=store, verifier=verifier), server
    )
    console_pb2_grpc.add_ConsoleServiceServicer_to_server(
        ConsoleServicer(store=store, verifier=verifier), server
    )
    log.info(
        "key management API: %d sign-in provider(s) trusted (AUTHZ_JWT_ISSUERS)",
        len(settings.jwt_issuers),
    )
    reflection.enable_server_reflection(
        (
            external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            als_pb2.DESCRIPTOR.services_by_name["AccessLogService"].full_name,
            keys_pb2.DESCRIPTOR.services_by_name["KeyService"].full_name,
            console_pb2.DESCRIPTOR.services_by_name["ConsoleService"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    try:
        server.add_insecure_port(settings.grpc_addr)
    except RuntimeError as error:
        raise StartupError(
            f"cannot listen on AUTHZ_GRPC_ADDR={settings.grpc_addr}: {error}"
        ) from None
    metrics_host, metrics_port = _split_addr(settings.metrics_addr)
    try:
        http_server, http_thread = start_http_server(
            metrics_port, addr=metrics_host, registry=metrics.registry
        )
    except OSError as error:
        raise StartupError(
            f"cannot listen on AUTHZ_METRICS_ADDR={settings.metrics_addr}: {error}"
        ) from None

    await server.start()
    await readiness.probe()
    background: list[asyncio.Task[None]] = [
        asyncio.create_task(
            _forever(store.watch_changes(FanOut([resolver, accountant]))), name="change-feed"
        ),
        asyncio.create_task(_forever(accountant.run()), name="ledger"),
        asyncio.create_task(_forever(readiness.run()), name="readiness"),
        asyncio.create_task(_forever(last_used.run()), name="last-used"),
    ]
    log.info(
        "serving ext_authz on %s, metrics on %s, database %s, rate limits %s, failure mode %s",
        settings.grpc_addr,
        settings.metrics_addr,
        redact_url(settings.database_url),
        redact_url(settings.redis_url) if settings.redis_url else "in-process",
        settings.failure_mode,
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    log.info("shutting down: NOT_SERVING, draining for %.1fs", settings.drain_delay_s)
    await readiness.shutdown()
    await asyncio.sleep(settings.drain_delay_s)
    await server.stop(settings.shutdown_grace_s)
    for task in background:
        task.cancel()
    await asyncio.gather(*background, return_exceptions=True)
    await last_used.flush()
    await accountant.flush()
    await limiter.close()
    await store.close()
    http_server.shutdown()
    http_thread.join(timeout=2)
    log.info("stopped")
    return 0


async def _forever(job: Coroutine[Any, Any, None]) -> None:
    """Run a background job; a crash is a bug, so log it loudly rather than lose it."""
    try:
        await job
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("background task crashed")
        raise


def run(settings: Settings) -> int:
    """Run `serve` on uvloop when available."""
    configure_logging(settings.log_level, settings.log_format)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return asyncio.run(serve(settings))
    with contextlib.suppress(KeyboardInterrupt):
        return uvloop.run(serve(settings))
    return 0
