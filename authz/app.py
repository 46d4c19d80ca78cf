"""The composition root: the one place that builds the object graph.

`build(settings, **overrides)` returns the wired `App` (store, limiter, resolver, servicers,
gRPC server, metrics); `authz.server.serve(app)` runs it. Tests and the benchmark build through
the same function, overriding only what they must (a fake store, a limiter on a fake clock).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]  # old stubs
from prometheus_client import CollectorRegistry

from authz.api.gen import console_pb2, console_pb2_grpc, keys_pb2, keys_pb2_grpc
from authz.check import AuthorizationServicer
from authz.console.service import ConsoleServicer
from authz.grpcservices import HealthServicer, add_reflection
from authz.health import PoolWatch, Readiness
from authz.identity import IdentityVerifier
from authz.keyservice import KeyServicer
from authz.lastused import LastUsedRecorder
from authz.logs import configure_logging
from authz.metrics import Metrics
from authz.resolver import KeyResolver
from authz.responses import AllowRenderer
from authz.server import StartupError, grpc_server_options, serve, stop_requested
from authz.settings import Settings, SettingsError
from authz.store import open_store
from authz.store.base import Store, StoreError
from authz.streams import StoppableAccessLog, StreamStop
from authz.supervisor import Sleep, Supervisor
from authz.tracing import Tracing
from authz.usage.accesslog import ReservationGate
from authz.usage.accountant import UsageAccountant
from authz.usage.observations import ObservationSink, ObservedAccessLog
from authz.usage.pricing import PriceTable
from authz.usage.replay import MemoryReplayGuard, RedisReplayGuard, ReplayGuard
from authz.usage.reservations import Keyring
from authz.usage.seeding import QuotaSeeder
from ratelimit.breaker import CircuitBreaker
from ratelimit.limiter import RateLimiter
from ratelimit.memory import InMemoryRateLimiter
from ratelimit.redis_backend import RedisClient, RedisRateLimiter, connect_redis
from ratelimit.redis_cluster import shared_commands

log = logging.getLogger("authz")


@dataclass(frozen=True, slots=True)
class App:
    """The wired sidecar, not yet listening: `authz.server.serve(app)` runs it."""

    settings: Settings
    metrics: Metrics
    store: Store
    limiter: RateLimiter
    resolver: KeyResolver
    last_used: LastUsedRecorder
    prices: PriceTable
    accountant: UsageAccountant
    keyring: Keyring
    authorization: AuthorizationServicer
    health: health_aio.HealthServicer
    readiness: Readiness
    supervisor: Supervisor
    streams: StreamStop
    access_log: als_pb2_grpc.AccessLogServiceServicer
    """The servicer `server` runs for Envoy's access-log stream (the benchmark drives it)."""
    server: grpc.aio.Server
    tracing: Tracing
    health_server: grpc.aio.Server | None


def health_only_server(health: health_aio.HealthServicer) -> grpc.aio.Server:
    """grpc.health.v1 alone, for probes on an address the other services are not on."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    return server


def _redis_client(settings: Settings) -> RedisClient | None:
    if settings.redis_url is None:
        return None
    try:
        return connect_redis(settings.redis_url, timeout_seconds=settings.redis_timeout_ms / 1000)
    except ValueError as error:
        raise SettingsError("AUTHZ_REDIS_URL", str(error)) from None


def build_limiter(settings: Settings, metrics: Metrics, client: RedisClient | None) -> RateLimiter:
    if client is None:
        return InMemoryRateLimiter()
    timeout = settings.redis_timeout_ms / 1000
    breaker = CircuitBreaker(
        failure_threshold=settings.redis_breaker_failures,
        cooldown_seconds=settings.redis_breaker_cooldown_ms / 1000,
    )
    return RedisRateLimiter(
        client, timeout_seconds=timeout, breaker=breaker, metrics=metrics.limiter
    )


async def build(
    settings: Settings,
    *,
    store: Store | None = None,
    limiter: RateLimiter | None = None,
    clock: Callable[[], float] | None = None,
    registry: CollectorRegistry | None = None,
    tracing: Tracing | None = None,
    restart_sleep: Sleep | None = None,
) -> App:
    """Build everything `settings` describes; each override replaces one collaborator.

    `clock` (seconds) drives the key cache's TTLs, grace deadlines and `last_used_at`, so a
    test can move time for all of them at once; production uses the wall clock.
    `restart_sleep` waits out the backoff before a crashed background task is restarted.
    """
    metrics = Metrics(
        registry or CollectorRegistry(), workspace_label=settings.metrics_workspace_label
    )
    if tracing is None:
        tracing = Tracing.from_environment(os.environ)
    # One Redis client: the limiter's (it closes it), shared by the access-log replay check
    # (a test that overrides the limiter gets the in-process replay memory).
    redis = _redis_client(settings) if limiter is None else None
    if limiter is None:
        limiter = build_limiter(settings, metrics, redis)
    # Opened last of the fallible steps: an open store holds a thread that would keep a
    # failed start-up alive.
    pool = PoolWatch(metrics)
    if store is None:
        options = settings.store_options()
        options["pool_observer"] = pool
        store = await open_store(settings.database_url, **options)
    resolver = KeyResolver(
        store,
        metrics,
        size=settings.cache_size,
        ttl=settings.cache_ttl_s,
        negative_size=settings.negative_cache_size,
        negative_ttl=settings.negative_cache_ttl_s,
        stale_if_error=settings.stale_if_error_s,
        clock=clock or time.monotonic,
        tracing=tracing.check,
    )
    last_used = LastUsedRecorder(
        store, interval=settings.last_used_flush_s, clock=clock or time.time
    )
    prices = PriceTable()
    # One seeder for the Check path and the usage reports: one seed per month at a time.
    seeder = QuotaSeeder(store, limiter, timeout_s=settings.db_timeout_ms / 1000)
    accountant = UsageAccountant(
        store=store,
        limiter=limiter,
        resolver=resolver,
        prices=prices,
        metrics=metrics,
        flush_interval=settings.ledger_flush_s,
        seeder=seeder,
    )
    wall_clock = clock or time.time
    keyring = Keyring(store, clock=wall_clock)
    await keyring.load()
    replay: ReplayGuard = (
        MemoryReplayGuard(clock=wall_clock)
        if redis is None
        else RedisReplayGuard(shared_commands(redis))
    )
    gate = ReservationGate(keyring=keyring, replay=replay, metrics=metrics, clock=wall_clock)
    observations = ObservationSink(store=store, clock=wall_clock)
    authorization = AuthorizationServicer(
        resolver=resolver,
        limiter=limiter,
        metrics=metrics,
        renderer=AllowRenderer(keep_authorization=settings.keep_authorization),
        last_used=last_used,
        prices=prices,
        seeder=seeder,
        keyring=keyring,
        fail_open=settings.failure_mode == "open",
        max_request_bytes=settings.max_request_bytes,
        wall_clock=wall_clock,
        tracing=tracing.check,
        denials=observations.denied,
    )
    health = HealthServicer()
    readiness = Readiness(
        health,
        store=store,
        limiter=limiter,
        metrics=metrics,
        limiter_required=settings.redis_url is not None and settings.failure_mode == "closed",
        interval=settings.health_interval_s,
        backlogs={"ledger": accountant.backlog_problem, "db_pool": pool.problem},
    )
    supervisor = Supervisor(
        readiness=readiness, metrics=metrics, sleep=restart_sleep or asyncio.sleep
    )
    server = grpc.aio.server(options=grpc_server_options(settings))
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(authorization, server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    streams = StreamStop()
    access_log = StoppableAccessLog(
        ObservedAccessLog(accountant, gate=gate, sink=observations), streams
    )
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(access_log, server)
    verifier = IdentityVerifier(
        settings.jwt_issuers, jwks_timeout_s=settings.jwks_timeout_ms / 1000
    )
    keys_pb2_grpc.add_KeyServiceServicer_to_server(
        KeyServicer(store=store, verifier=verifier), server
    )
    console_pb2_grpc.add_ConsoleServiceServicer_to_server(
        ConsoleServicer(store=store, verifier=verifier), server
    )
    add_reflection(
        server,
        (
            external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            als_pb2.DESCRIPTOR.services_by_name["AccessLogService"].full_name,
            keys_pb2.DESCRIPTOR.services_by_name["KeyService"].full_name,
            console_pb2.DESCRIPTOR.services_by_name["ConsoleService"].full_name,
        ),
    )
    return App(
        settings=settings,
        metrics=metrics,
        store=store,
        limiter=limiter,
        resolver=resolver,
        last_used=last_used,
        prices=prices,
        accountant=accountant,
        keyring=keyring,
        authorization=authorization,
        health=health,
        readiness=readiness,
        supervisor=supervisor,
        streams=streams,
        access_log=access_log,
        server=server,
        tracing=tracing,
        health_server=health_only_server(health) if settings.health_addr else None,
    )


__all__ = ["App", "StartupError", "build", "run"]


async def build_and_serve(settings: Settings) -> int:
    stopping = stop_requested()
    try:
        app = await build(settings)
        log.info(
            "key management API: %d sign-in provider(s) trusted (AUTHZ_JWT_ISSUERS)",
            len(settings.jwt_issuers),
        )
        return await serve(app, stopping)
    except (StartupError, StoreError) as error:
        # One line in the configured log format; `start` has already released every port.
        log.error("cannot start: %s", error)
        return 1


def run(settings: Settings) -> int:
    """The `authz serve` entry point: build, then serve on uvloop when available."""
    configure_logging(settings.log_level, settings.log_format)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return asyncio.run(build_and_serve(settings))
    with contextlib.suppress(KeyboardInterrupt):
        return uvloop.run(build_and_serve(settings))
    return 0
