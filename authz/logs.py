"""Log set-up: human-readable text, or one JSON object per line for log pipelines."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime

from authz.textsafe import InertTextFormatter


class ThrottledLog:
    """Warnings that would repeat on every request: one line per reason per interval.

    The repeats in between are counted and the count rides on the next line for that reason,
    so a 10 s Redis outage reads as a few lines with counts, not one line per failed Check.
    Metrics still count every occurrence.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._interval_s = interval_s
        self._clock = clock
        self._last: dict[str, float] = {}
        self._repeats: dict[str, int] = {}

    def warning(self, reason: str, message: str, *args: object) -> None:
        now = self._clock()
        last = self._last.get(reason)
        if last is not None and now - last < self._interval_s:
            self._repeats[reason] = self._repeats.get(reason, 0) + 1
            return
        self._last[reason] = now
        repeats = self._repeats.pop(reason, 0)
        if repeats:
            self._log.warning(message + " (and %d more since the last such line)", *args, repeats)
        else:
            self._log.warning(message, *args)


WORKER_PROCESS_PREFIX = "authz-worker-"
"""AUTHZ_WORKERS > 1: worker i runs in the process named this + i (authz.workers)."""


def worker_process_name(index: int) -> str:
    return f"{WORKER_PROCESS_PREFIX}{index}"


def worker_index(process_name: str | None) -> int | None:
    """The worker index of a process named by `worker_process_name`, else None."""
    if process_name is None or not process_name.startswith(WORKER_PROCESS_PREFIX):
        return None
    suffix = process_name.removeprefix(WORKER_PROCESS_PREFIX)
    return int(suffix) if suffix.isdigit() else None


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "message", "pid"[, "worker"][, "exc"]}`; messages already
    hold masks only. With AUTHZ_WORKERS > 1 every worker writes to the same stream: `pid` and
    `worker` (its index, absent in a single process and in the workers' supervisor) tell
    their lines apart."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat().replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        worker = worker_index(record.processName)
        if worker is not None:
            entry["worker"] = worker
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str, log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(InertTextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries' debug lines come once per call ("Loaded running loop", each SQL statement);
    # AUTHZ_LOG_LEVEL=debug is for our own decisions, so theirs stay at info and above.
    for chatty in _CHATTY_LIBRARIES:
        logging.getLogger(chatty).setLevel(max(logging.INFO, root.level))


_CHATTY_LIBRARIES = ("grpc", "aiosqlite", "asyncio", "asyncpg", "urllib3", "hpack")
