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
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, replace
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as EventType
from types import FrameType

from authz.logs import configure_logging, worker_process_name
from authz.settings import Settings

log = logging.getLogger("authz")

STOP_TIMEOUT_S = 60.0
"""A worker still running this long after the supervisor forwarded SIGTERM is killed."""

ARMING_POLL_S = 0.05
"""While stopping, how often the supervisor looks for workers newly able to take the signal."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

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
    workers = []
    for i in range(settings.workers):
        armed = context.Event()
        process = context.Process(
            target=_worker,
            args=(serve, worker_settings(settings, i), armed),
            name=worker_process_name(i),
        )
        workers.append(_Worker(process, armed))
    asked: list[int] = []  # the stop signals received

    def record(signum: int, _frame: FrameType | None) -> None:
        # Only recorded: forwarding reads each worker's `armed` Event, whose lock a handler
        # must not take (it may have interrupted the supervisor holding it: a deadlock on a
        # second signal). The wakeup fd wakes `_supervise`, which forwards at once.
        asked.append(signum)

    wake, wake_write = os.pipe()
    for fd in (wake, wake_write):
        os.set_blocking(fd, False)
    previous_wakeup = signal.set_wakeup_fd(wake_write)
    previous = {sig: signal.signal(sig, record) for sig in STOP_SIGNALS}
    try:
        for worker in workers:
            worker.process.start()
        log.info("started %d workers on %s", len(workers), settings.grpc_addr)
        return _supervise(workers, asked, wake)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(previous_wakeup)
        os.close(wake)
        os.close(wake_write)


@dataclass(slots=True)
class _Worker:
    process: BaseProcess
    armed: EventType
    """Set by the worker once a stop signal ends it cleanly. Before that a signal is lost (sent
    between its fork and its exec: the worker then served on until killed 60 s later) or meets
    the default handler (exit 143, reported as a failure), so it is held back until then."""
    signalled: bool = False


def _forward(workers: Sequence[_Worker], signum: int) -> None:
    """Send the stop signal to each running worker able to take it, once."""
    for worker in workers:
        process = worker.process
        if worker.signalled or process.pid is None or process.exitcode is not None:
            continue
        if worker.armed.is_set():
            worker.signalled = True
            os.kill(process.pid, signum)


def _supervise(workers: Sequence[_Worker], asked: Sequence[int], wake: int) -> int:
    """Wait for every worker; the first to exit unasked stops the rest and sets the code.

    `wake` turns readable when a signal arrives (signal.set_wakeup_fd), so the wait ends then.
    """
    code = 0
    stop_signal: int | None = None
    stop_deadline = 0.0
    running = {worker.process.sentinel: worker for worker in workers}
    while running:
        if stop_signal is None and asked:
            stop_signal, stop_deadline = asked[0], time.monotonic() + STOP_TIMEOUT_S
        if stop_signal is not None:
            _forward(list(running.values()), stop_signal)  # to workers armed since
        ready = wait([*running, wake], timeout=1.0 if stop_signal is None else ARMING_POLL_S)
        if wake in ready:
            with suppress(BlockingIOError):
                os.read(wake, 512)
        ended = [sentinel for sentinel in ready if sentinel != wake]
        if not ended and stop_signal is not None and time.monotonic() > stop_deadline:
            for worker in running.values():
                log.error("%s did not stop in %.0f s: killed", worker.process.name, STOP_TIMEOUT_S)
                worker.process.kill()
        for sentinel in ended:
            assert isinstance(sentinel, int)  # wait() hands back the sentinels it was given
            process = running.pop(sentinel).process
            process.join()
            exit_code = process.exitcode or 0
            if exit_code < 0:  # killed by a signal: reported as a shell does
                exit_code = 128 - exit_code
            if stop_signal is None and not asked:
                log.error("%s exited (code %s): stopping the others", process.name, exit_code)
                exit_code = exit_code or 1
                stop_signal, stop_deadline = signal.SIGTERM, time.monotonic() + STOP_TIMEOUT_S
            code = code or exit_code
    return code


def _worker(serve: Serve, settings: Settings, armed: EventType) -> None:
    # Until its event loop takes SIGTERM over, a stop signal ends the worker cleanly: nothing is
    # served yet, so nothing needs draining, and exit 0 is not reported as a failure.
    for sig in STOP_SIGNALS:
        signal.signal(sig, _exit_before_serving)
    armed.set()
    raise SystemExit(serve(settings))


def _exit_before_serving(_signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(0)
