"""Log set-up: human-readable text, or one JSON object per line for log pipelines."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from authz.textsafe import InertTextFormatter


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "message"[, "exc"]}`; messages already hold masks only."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat().replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
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
