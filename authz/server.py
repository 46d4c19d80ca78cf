"""Serving a built App: listeners, background tasks, SIGTERM, drain and stop."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from pathlib import Path
from threading import Thread
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health_pb2
from prometheus_client import start_http_server

from authz.fanout import FanOut
from authz.health import AUTHZ_SERVICE
from authz.settings import Settings, redact_url

if TYPE_CHECKING:
    from authz.app import App

log = logging.getLogger("authz")


class StartupError(Exception):
    """The sidecar cannot start; the message says why in one line."""


@dataclass(slots=True)
class Running:
    """What `start` opened, for `stop` to close: the bound gRPC port and the tasks."""

    grpc_port: int
    background: list[asyncio.Task[None]]
    http: tuple[WSGIServer, Thread] | None
    health_port: int | None = None


MAX_PENDING_CALLS = 16384
"""Calls gRPC holds before the sidecar takes them (the `authz` cluster's `max_requests`).
gRPC's defaults (1,000, rejecting at random up to a hard 3,000) cancelled Checks in a burst of
2,000 through one Envoy: a 503 for a healthy sidecar. Past the budget a Check is shed instead
(authz.check), and Envoy's deadline bounds the wait."""


def grpc_server_options(settings: Settings) -> list[tuple[str, int]]:
    """The ext_authz server's gRPC options. Compression stays off (gRPC's default)."""
    return [
        # Workers (authz.workers) share the port; a lone process must not share it by accident.
        ("grpc.so_reuseport", int(settings.workers > 1)),
        ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
        ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
    ]


def _split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


async def start(app: App, *, serve_metrics: bool = True) -> Running:
    """Bind the listeners, start the background work, and probe readiness once.

    On any failure everything opened so far is closed again before the StartupError leaves:
    nothing stays bound and no thread keeps the process alive.
    """
    await app.health.set(AUTHZ_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    running = Running(grpc_port=0, background=[], http=None)
    try:
        running.grpc_port = _bind_grpc(app)
        if app.health_server is not None:
            running.health_port = _bind(
                app.health_server, "AUTHZ_HEALTH_ADDR", str(app.settings.health_addr), None
            )
            await app.health_server.start()
        if serve_metrics:
            running.http = _serve_metrics(app)
        await app.server.start()
        await app.readiness.probe()
    except BaseException:
        await _release(app, running, grace_s=None)
        raise
    feed = FanOut([app.resolver, app.accountant])
    supervisor = app.supervisor
    running.background = [
        supervisor.start("change-feed", lambda: app.store.watch_changes(feed)),
        supervisor.start("ledger", app.accountant.run),
        supervisor.start("readiness", app.readiness.run),
        supervisor.start("last-used", app.last_used.run),
    ]
    return running


def _transport(settings: Settings) -> str:
    if settings.tls_cert is None:
        return "plaintext"
    return "TLS, client certificates required" if settings.tls_client_ca else "TLS"


def _bind_grpc(app: App) -> int:
    settings = app.settings
    credentials = None
    if settings.tls_cert is not None and settings.tls_key is not None:
        credentials = _server_credentials(
            settings.tls_cert, settings.tls_key, settings.tls_client_ca
        )
    return _bind(app.server, "AUTHZ_GRPC_ADDR", settings.grpc_addr, credentials)


def _server_credentials(cert: str, key: str, client_ca: str | None) -> grpc.ServerCredentials:
    """Server TLS; with a client CA, only clients holding a certificate it signed connect."""
    try:
        chain, private_key = Path(cert).read_bytes(), Path(key).read_bytes()
        roots = Path(client_ca).read_bytes() if client_ca is not None else None
    except OSError as error:
        raise StartupError(f"cannot read TLS material: {error}") from None
    return grpc.ssl_server_credentials(
        [(private_key, chain)], root_certificates=roots, require_client_auth=roots is not None
    )


def _bind(
    server: grpc.aio.Server, setting: str, addr: str, credentials: grpc.ServerCredentials | None
) -> int:
    try:
        if credentials is None:
            return server.add_insecure_port(addr)
        return server.add_secure_port(addr, credentials)
    except RuntimeError as error:
        # grpc's text ends in advice about GRPC_VERBOSITY; the first clause is the point.
        reason = str(error).split(";")[0]
        raise StartupError(f"cannot listen on {setting}={addr}: {reason}") from None


def _serve_metrics(app: App) -> tuple[WSGIServer, Thread]:
    addr = app.settings.metrics_addr
    host, port = _split_addr(addr)
    try:
        return start_http_server(port, addr=host, registry=app.metrics.registry)
    except OSError as error:
        raise StartupError(f"cannot listen on AUTHZ_METRICS_ADDR={addr}: {error}") from None


async def stop(app: App, running: Running, *, drain_delay_s: float, grace_s: float) -> None:
    """NOT_SERVING, wait for Envoy to notice, let in-flight calls finish, flush, close."""
    await app.readiness.shutdown()
    await asyncio.sleep(drain_delay_s)
    await _release(app, running, grace_s=grace_s)


async def _release(app: App, running: Running, *, grace_s: float | None) -> None:
    """Stop serving, stop the background work, flush what is buffered and close everything."""
    # Checks in flight get `grace_s`; the access-log streams end now rather than hold it.
    app.streams.stop()
    await app.server.stop(grace_s)
    if app.health_server is not None:
        await app.health_server.stop(None)
    await app.supervisor.stop()
    await app.last_used.flush()
    await app.accountant.flush()
    await app.tracing.shutdown()
    await app.limiter.close()
    await app.store.close()
    if running.http is not None:
        http_server, http_thread = running.http
        http_server.shutdown()
        http_server.server_close()
        http_thread.join(timeout=2)


def stop_requested() -> asyncio.Event:
    """An event set by SIGTERM/SIGINT, installed on the running loop before anything starts.

    Installed first so that a SIGTERM at any point of start-up (an orchestrator stopping a pod
    the moment it turned ready, say) drains and exits 0 like any other, rather than meeting
    the default handler and killing the process mid-start.
    """
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    return stopping


async def serve(app: App, stopping: asyncio.Event) -> int:
    """Run the sidecar until `stopping` is set (SIGTERM/SIGINT), then drain and return 0."""
    settings = app.settings
    running = await start(app)
    log.info(
        "serving ext_authz on %s (%s), health%s, metrics on %s, database %s, rate limits %s, "
        "failure mode %s",
        settings.grpc_addr,
        _transport(settings),
        f" alone also on {settings.health_addr}" if settings.health_addr else " there",
        settings.metrics_addr,
        redact_url(settings.database_url),
        redact_url(settings.redis_url) if settings.redis_url else "in-process",
        settings.failure_mode,
    )
    await stopping.wait()
    log.info("shutting down: NOT_SERVING, draining for %.1fs", settings.drain_delay_s)
    await stop(
        app, running, drain_delay_s=settings.drain_delay_s, grace_s=settings.shutdown_grace_s
    )
    log.info("stopped")
    return 0
