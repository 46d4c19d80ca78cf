"""`AUTHZ_WORKERS=N`: N sidecar processes on one host, sharing the gRPC port.

Python runs one Check at a time per process, so one process uses at most one core. With N > 1
the `authz serve` process becomes a supervisor: it starts N workers (spawned, so none inherits
a half-initialised gRPC or event loop) and runs no server itself. Every worker is a whole
sidecar: its own key cache, change feed, ledger and Redis pools; the kernel spreads incoming
connections across them (SO_REUSEPORT on AUTHZ_GRPC_ADDR). The rate-limit buckets must be
shared, hence Redis only (settings refuse N > 1 without AUTHZ_REDIS_URL).

* Metrics: one port per worker, AUTHZ_METRICS_ADDR's port + i for worker i (0-based), each
  labelled by nothing more than its port: scrape all N (docs: README "Workers").
* Health: each worker answers for itself on the shared port; if any worker exits, the
  supervisor stops the others and exits with its code, so the orchestrator sees one failure
  rather than a pod quietly running on fewer workers.
* SIGTERM/SIGINT: forwarded to every worker, which drains as a single sidecar does; the
  supervisor exits when all have, with the first non-zero exit code (else 0).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import replace
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType

from authz.logs import configure_logging, worker_process_name
from authz.settings import Settings

log = logging.getLogger("authz")

STOP_TIMEOUT_S = 60.0
"""A worker still running this long after the supervisor forwarded SIGTERM is killed."""

Serve = Callable[[Settings], int]


def worker_settings(settings: Settings, index: int) -> Settings:
    """Worker `index`'s settings: the shared gRPC address, its own metrics port."""
    host, _, port = settings.metrics_addr.rpartition(":")
    return replace(settings, metrics_addr=f"{host}:{int(port) + index}")


def run_workers(settings: Settings, serve: Serve) -> int:
    """`serve(settings)` in this process for one worker, else in N supervised processes."""
    if settings.workers == 1:
        return serve(settings)
    configure_logging(settings.log_level, settings.log_format)
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(
            target=_worker, args=(serve, worker_settings(settings, i)), name=worker_process_name(i)
        )
        for i in range(settings.workers)
    ]
    stopping = False

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for worker in workers:
            if worker.pid is not None and worker.exitcode is None:
                os.kill(worker.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for worker in workers:
            worker.start()
        log.info("started %d workers on %s", len(workers), settings.grpc_addr)
        return _supervise(workers, lambda: stopping)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _supervise(workers: Sequence[BaseProcess], asked_to_stop: Callable[[], bool]) -> int:
    """Wait for every worker; the first to exit unasked stops the rest and sets the code."""
    code = 0
    stopping = False
    running = {worker.sentinel: worker for worker in workers}
    while running:
        stopping = stopping or asked_to_stop()
        ended = wait(list(running), timeout=STOP_TIMEOUT_S if stopping else 1.0)
        if not ended and stopping:
            for worker in running.values():
                log.error("%s did not stop in %.0f s: killed", worker.name, STOP_TIMEOUT_S)
                worker.kill()
        for sentinel in ended:
            assert isinstance(sentinel, int)  # wait() hands back the sentinels it was given
            worker = running.pop(sentinel)
            worker.join()
            exit_code = worker.exitcode or 0
            if exit_code < 0:  # killed by a signal: reported as a shell does
                exit_code = 128 - exit_code
            if not (stopping or asked_to_stop()):
                log.error("%s exited (code %s): stopping the others", worker.name, exit_code)
                exit_code = exit_code or 1
                stopping = True
                for other in running.values():
                    other.terminate()
            code = code or exit_code
    return code


def _worker(serve: Serve, settings: Settings) -> None:
    raise SystemExit(serve(settings))
