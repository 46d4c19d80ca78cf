"""Settings: one typed, frozen object, read once at start-up, validated with the setting's name.

Every setting is an environment variable `AUTHZ_<NAME>` and the same `--<name>` flag on
`authz serve`; a flag wins over the environment, which wins over the default.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from authz.identity import IssuerConfig, load_issuers
from authz.urls import is_sqlite_url
from authz.urls import redact_url as redact_url  # re-exported: callers predate authz.urls

if TYPE_CHECKING:
    from authz.store import StoreOptions


class SettingsError(ValueError):
    """A bad setting; the message names it and says what is expected."""

    def __init__(self, env_name: str, message: str) -> None:
        super().__init__(f"invalid setting {env_name}: {message}")
        self.env_name = env_name


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the sidecar is configured with (see the README's settings table)."""

    database_url: str = "sqlite:///./authz.db"
    redis_url: str | None = None
    grpc_addr: str = "127.0.0.1:9191"
    metrics_addr: str = "127.0.0.1:9464"
    health_addr: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    failure_mode: Literal["closed", "open"] = "closed"
    keep_authorization: bool = False
    max_request_bytes: int = 65536
    db_timeout_ms: int = 150
    redis_timeout_ms: int = 50
    redis_breaker_failures: int = 3
    redis_breaker_cooldown_ms: int = 250
    db_pool_size: int = 2
    database_listen_url: str | None = None
    database_statement_cache: bool = True
    cache_size: int = 100_000
    cache_ttl_s: float = 60.0
    negative_cache_size: int = 10_000
    negative_cache_ttl_s: float = 10.0
    stale_if_error_s: float = 900.0
    change_poll_ms: int = 250
    last_used_flush_s: float = 10.0
    ledger_flush_s: float = 2.0
    health_interval_s: float = 1.0
    drain_delay_s: float = 5.0
    shutdown_grace_s: float = 5.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    metrics_workspace_label: bool = True
    jwt_issuers: tuple[IssuerConfig, ...] = ()
    jwks_timeout_ms: int = 2000
    workers: int = 1

    @property
    def is_sqlite(self) -> bool:
        return is_sqlite_url(self.database_url)

    def store_options(self, *, request_path: bool = True) -> StoreOptions:
        """The keyword options `open_store` takes, from these settings.

        AUTHZ_DB_TIMEOUT_MS bounds reads on the request path; a one-shot command (the CLI)
        is not on it, and may wait for its first connection as long as for a write.
        """
        return {
            "read_timeout": self.db_timeout_ms / 1000 if request_path else _COMMAND_TIMEOUT_S,
            "pool_size": self.db_pool_size,
            "listen_url": self.database_listen_url,
            "statement_cache": self.database_statement_cache,
            "poll_interval": self.change_poll_ms / 1000,
        }


_COMMAND_TIMEOUT_S = 10.0


_HELP: dict[str, str] = {
    "database_url": "sqlite:///PATH (embedded) or postgresql://... ",
    "redis_url": "redis://, rediss://, redis+cluster://h:p[,h:p]; unset = in-process buckets",
    "grpc_addr": "host:port for ext_authz, health and reflection",
    "metrics_addr": "host:port for Prometheus /metrics",
    "health_addr": "host:port serving grpc.health.v1 alone (kubelet probes); unset = none",
    "tls_cert": "PEM certificate chain: serve AUTHZ_GRPC_ADDR over TLS (with AUTHZ_TLS_KEY)",
    "tls_key": "PEM private key of AUTHZ_TLS_CERT",
    "tls_client_ca": "PEM CA bundle: require client certificates it signed (needs AUTHZ_TLS_CERT)",
    "failure_mode": "closed (gRPC UNAVAILABLE) or open (allow) when the rate-limit backend fails",
    "keep_authorization": "forward the client's Authorization header to the upstream",
    "max_request_bytes": "Envoy's with_request_body max_request_bytes: a body this long was cut",
    "db_timeout_ms": "timeout of every database call on the request path",
    "redis_timeout_ms": "timeout of every Redis call; keep far below Envoy's ext_authz timeout",
    "redis_breaker_failures": "consecutive Redis failures that open the circuit breaker",
    "redis_breaker_cooldown_ms": "open circuit: ms before one probe call is let through",
    "db_pool_size": "maximum pooled PostgreSQL connections per process (plus one for LISTEN)",
    "database_listen_url": "PostgreSQL URL of the change feed LISTEN session; unset = DATABASE_URL",
    "database_statement_cache": "asyncpg prepared-statement cache; false behind PgBouncer",
    "cache_size": "maximum cached known keys (LRU)",
    "cache_ttl_s": "seconds a cached key or workspace is trusted without a re-read",
    "negative_cache_size": "maximum cached unknown key hashes",
    "negative_cache_ttl_s": "seconds an unknown key hash is remembered",
    "stale_if_error_s": "seconds an expired cache entry may still serve while the database is down",
    "change_poll_ms": "embedded store: how often to look for revocations and limit changes",
    "last_used_flush_s": "seconds between batched last_used_at writes",
    "ledger_flush_s": "seconds between billing-ledger flushes (also flushed on shutdown)",
    "health_interval_s": "seconds between readiness probes of the database and Redis",
    "drain_delay_s": "on SIGTERM: seconds NOT_SERVING before the gRPC server stops accepting;"
    " Envoy's health checks' worst-case notice plus one interval (docs/deploy.md)",
    "shutdown_grace_s": "on SIGTERM: seconds in-flight RPCs get to finish",
    "log_level": "debug, info, warning or error",
    "log_format": "text, or json (one object per line)",
    "metrics_workspace_label": "label per-workspace metrics with the workspace id",
    "jwt_issuers": "sign-in providers for key management: a JSON file path or inline JSON",
    "jwks_timeout_ms": "timeout of each fetch of a sign-in provider's JWKS",
    "workers": "processes sharing AUTHZ_GRPC_ADDR (SO_REUSEPORT); >1 needs AUTHZ_REDIS_URL;"
    " worker i serves metrics on AUTHZ_METRICS_ADDR's port + i",
}


def env_name(field_name: str) -> str:
    return "AUTHZ_" + field_name.upper()


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def parse_bool(raw: str) -> bool:
    """A boolean setting: 1/true/yes/on or 0/false/no/off, any case."""
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("expected true or false")


def _parse_positive_int(raw: str) -> int:
    value = int(raw.strip())
    if value <= 0:
        raise ValueError("expected a positive integer")
    return value


def _parse_non_negative_float(raw: str) -> float:
    value = float(raw.strip())
    if not math.isfinite(value) or value < 0:
        raise ValueError("expected a non-negative number")
    return value


def _parse_positive_float(raw: str) -> float:
    value = _parse_non_negative_float(raw)
    if value == 0:
        raise ValueError("expected a positive number")
    return value


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise ValueError("expected one of " + ", ".join(allowed))
        return value

    return parse


def _parse_addr(raw: str) -> str:
    host, sep, port = raw.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("expected host:port, e.g. 127.0.0.1:9191")
    return raw.strip()


def _parse_readable_file(raw: str) -> str | None:
    path = raw.strip()
    if not path:
        return None
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise ValueError(f"cannot read the file: {error.strerror}") from None
    return path


def _parse_database_url(raw: str) -> str:
    value = raw.strip()
    scheme = urlsplit(value).scheme
    if scheme == "sqlite":
        if not value.startswith("sqlite:///") or value == "sqlite:///":
            raise ValueError("expected sqlite:///PATH")
        return value
    if scheme in {"postgresql", "postgres"}:
        return value
    raise ValueError("expected sqlite:///PATH or postgresql://USER@HOST:PORT/DB")


def _parse_listen_url(raw: str) -> str | None:
    value = raw.strip()
    if not value:
        return None
    if urlsplit(value).scheme not in {"postgresql", "postgres"}:
        raise ValueError("expected postgresql://USER@HOST:PORT/DB (LISTEN needs PostgreSQL)")
    return value


def _parse_redis_url(raw: str) -> str | None:
    value = raw.strip()
    if not value:
        return None
    scheme = urlsplit(value).scheme
    if scheme not in {"redis", "rediss", "unix", "redis+cluster", "rediss+cluster"}:
        raise ValueError("expected redis://, rediss:// or redis+cluster://HOST:PORT[,HOST:PORT]")
    if scheme != "unix" and not urlsplit(value.split(",")[0]).hostname:
        raise ValueError("the URL names no host")
    return value


_PARSERS: dict[str, Callable[[str], Any]] = {
    "database_url": _parse_database_url,
    "redis_url": _parse_redis_url,
    "grpc_addr": _parse_addr,
    "metrics_addr": _parse_addr,
    "health_addr": lambda raw: _parse_addr(raw) if raw.strip() else None,
    "tls_cert": _parse_readable_file,
    "tls_key": _parse_readable_file,
    "tls_client_ca": _parse_readable_file,
    "failure_mode": _choice("closed", "open"),
    "keep_authorization": parse_bool,
    "max_request_bytes": _parse_positive_int,
    "db_timeout_ms": _parse_positive_int,
    "redis_timeout_ms": _parse_positive_int,
    "redis_breaker_failures": _parse_positive_int,
    "redis_breaker_cooldown_ms": _parse_positive_int,
    "db_pool_size": _parse_positive_int,
    "database_listen_url": _parse_listen_url,
    "database_statement_cache": parse_bool,
    "cache_size": _parse_positive_int,
    "cache_ttl_s": _parse_non_negative_float,
    "negative_cache_size": _parse_positive_int,
    "negative_cache_ttl_s": _parse_non_negative_float,
    "stale_if_error_s": _parse_non_negative_float,
    "change_poll_ms": _parse_positive_int,
    "last_used_flush_s": _parse_non_negative_float,
    "ledger_flush_s": _parse_positive_float,
    "health_interval_s": _parse_non_negative_float,
    "drain_delay_s": _parse_non_negative_float,
    "shutdown_grace_s": _parse_non_negative_float,
    "log_level": _choice("debug", "info", "warning", "error"),
    "log_format": _choice("text", "json"),
    "metrics_workspace_label": parse_bool,
    "jwt_issuers": load_issuers,
    "jwks_timeout_ms": _parse_positive_int,
    "workers": _parse_positive_int,
}


def add_setting_flags(parser: argparse.ArgumentParser, only: tuple[str, ...] = ()) -> None:
    """Add `--<name>` for every setting (or just `only`), defaulting to "not given"."""
    for field in fields(Settings):
        if only and field.name not in only:
            continue
        parser.add_argument(
            flag_name(field.name),
            dest=f"setting_{field.name}",
            default=None,
            metavar=env_name(field.name),
            help=f"{_HELP[field.name]} (default: {field.default!r})",
        )


def load_settings(environ: Mapping[str, str], flags: argparse.Namespace | None = None) -> Settings:
    """Settings from flags, then the environment, then defaults; fails on the first bad one."""
    values: dict[str, Any] = {}
    for field in fields(Settings):
        raw = getattr(flags, f"setting_{field.name}", None) if flags is not None else None
        source = flag_name(field.name)
        if raw is None:
            raw = environ.get(env_name(field.name))
            source = env_name(field.name)
        if raw is None:
            continue
        try:
            values[field.name] = _PARSERS[field.name](raw)
        except ValueError as error:
            shown = raw if len(raw) <= 80 else raw[:77] + "..."
            raise SettingsError(source, f"{error} (got {redact_url(shown)!r})") from None
    settings = Settings(**values)
    _check_consistency(settings)
    return settings


def _check_consistency(settings: Settings) -> None:
    if settings.workers > 1 and settings.redis_url is None:
        raise SettingsError(
            "AUTHZ_WORKERS",
            "more than 1 worker needs AUTHZ_REDIS_URL: the in-process rate-limit buckets"
            " are per process, so N workers would admit N times each limit",
        )
    if int(settings.metrics_addr.rpartition(":")[2]) + settings.workers > 65536:
        raise SettingsError(
            "AUTHZ_WORKERS", "worker i serves metrics on AUTHZ_METRICS_ADDR's port + i: past 65535"
        )
    if settings.grpc_addr == settings.metrics_addr:
        raise SettingsError("AUTHZ_METRICS_ADDR", "must differ from AUTHZ_GRPC_ADDR")
    if settings.health_addr in {settings.grpc_addr, settings.metrics_addr}:
        raise SettingsError(
            "AUTHZ_HEALTH_ADDR", "must differ from AUTHZ_GRPC_ADDR and AUTHZ_METRICS_ADDR"
        )
    if (settings.tls_cert is None) != (settings.tls_key is None):
        missing = "AUTHZ_TLS_KEY" if settings.tls_key is None else "AUTHZ_TLS_CERT"
        raise SettingsError(missing, "AUTHZ_TLS_CERT and AUTHZ_TLS_KEY go together")
    if settings.tls_client_ca is not None and settings.tls_cert is None:
        raise SettingsError("AUTHZ_TLS_CLIENT_CA", "needs AUTHZ_TLS_CERT and AUTHZ_TLS_KEY")
    if settings.database_listen_url and settings.is_sqlite:
        raise SettingsError(
            "AUTHZ_DATABASE_LISTEN_URL", "needs a PostgreSQL AUTHZ_DATABASE_URL (SQLite polls)"
        )
