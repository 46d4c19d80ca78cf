"""The console's settings: AUTHZ_CONSOLE_* (and AUTHZ_JWT_ISSUERS, shared with `authz serve`).

Each is also a `--flag` on `python -m authz.console`; a flag wins over the environment. The
OIDC clients are console-only, so they live in AUTHZ_CONSOLE_CLIENTS rather than in the
issuer entries the key API reads; every client must name an issuer the key API trusts.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from authz.identity import IssuerConfig, load_issuers
from authz.settings import SettingsError, env_name, flag_name, parse_bool


@dataclass(frozen=True, slots=True)
class OidcClient:
    """How the console signs members in with one of the trusted issuers."""

    issuer: str
    client_id: str
    client_secret: str | None = None
    name: str = ""
    scope: str = "openid"

    @property
    def display_name(self) -> str:
        return self.name or urlsplit(self.issuer).hostname or self.issuer


@dataclass(frozen=True, slots=True)
class ConsoleSettings:
    """Everything the console is configured with (README, "Console settings")."""

    console_addr: str = "127.0.0.1:8090"
    console_public_url: str = "http://127.0.0.1:8080/console/"
    console_key_api: str = "127.0.0.1:9191"
    console_clients: tuple[OidcClient, ...] = ()
    console_cookie_secure: bool = True
    console_session_ttl_s: float = 8 * 3600.0
    console_timeout_ms: int = 5000
    jwt_issuers: tuple[IssuerConfig, ...] = ()
    jwks_timeout_ms: int = 2000

    @property
    def redirect_uri(self) -> str:
        return self.console_public_url + "auth/callback"

    @property
    def public_origin(self) -> str:
        parts = urlsplit(self.console_public_url)
        return f"{parts.scheme}://{parts.netloc}"


_HELP = {
    "console_addr": "host:port the console listens on (Envoy routes /console/ here)",
    "console_public_url": "the console's URL as browsers see it, ending in /console/",
    "console_key_api": "host:port of `authz serve`'s gRPC key management API",
    "console_clients": "OIDC clients: JSON list of {issuer, client_id, client_secret, name, scope}",
    "console_cookie_secure": "mark the session cookie Secure (false only for plain-http localhost)",
    "console_session_ttl_s": "longest a console session lasts (it also ends with its token)",
    "console_timeout_ms": "timeout of each call to the identity provider and the key API",
    "jwt_issuers": "sign-in providers (the same value `authz serve` gets)",
    "jwks_timeout_ms": "timeout of each fetch of a sign-in provider's JWKS",
}


def _addr(raw: str) -> str:
    host, sep, port = raw.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("expected host:port, e.g. 127.0.0.1:8090")
    return raw.strip()


def _public_url(raw: str) -> str:
    value = raw.strip()
    parts = urlsplit(value)
    if parts.scheme not in {"http", "https"} or not parts.netloc or not value.endswith("/"):
        raise ValueError("expected an http(s) URL ending in /, e.g. https://example.com/console/")
    return value


def _positive(kind: Callable[[str], float]) -> Callable[[str], Any]:
    def parse(raw: str) -> Any:
        value = kind(raw.strip())
        if not value > 0:
            raise ValueError("expected a positive number")
        return value

    return parse


def parse_clients(raw: str) -> tuple[OidcClient, ...]:
    """OIDC clients from inline JSON or a JSON file's path."""
    text = raw.strip()
    if text and not text.startswith("["):
        try:
            text = Path(text).read_text(encoding="utf-8")
        except OSError as error:
            raise ValueError(f"cannot read {raw.strip()}: {error.strerror}") from None
    try:
        document = json.loads(text or "[]")
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON: {error}") from None
    if not isinstance(document, list):
        raise ValueError("expected a JSON list of clients")
    clients = []
    known = {f.name for f in fields(OidcClient)}
    for number, entry in enumerate(document, start=1):
        if not isinstance(entry, dict) or set(entry) - known:
            raise ValueError(f"client #{number}: expected an object with fields {sorted(known)}")
        if not all(isinstance(entry.get(n), str) and entry[n] for n in ("issuer", "client_id")):
            raise ValueError(f"client #{number}: 'issuer' and 'client_id' are required strings")
        if not all(isinstance(v, str) for v in entry.values()):
            raise ValueError(f"client #{number}: every field is a string")
        clients.append(OidcClient(**entry))
    return tuple(clients)


_PARSERS: dict[str, Callable[[str], Any]] = {
    "console_addr": _addr,
    "console_public_url": _public_url,
    "console_key_api": _addr,
    "console_clients": parse_clients,
    "console_cookie_secure": parse_bool,
    "console_session_ttl_s": _positive(float),
    "console_timeout_ms": _positive(int),
    "jwt_issuers": load_issuers,
    "jwks_timeout_ms": _positive(int),
}


def add_flags(parser: argparse.ArgumentParser) -> None:
    for field in fields(ConsoleSettings):
        parser.add_argument(
            flag_name(field.name),
            dest=f"setting_{field.name}",
            default=None,
            metavar=env_name(field.name),
            help=f"{_HELP[field.name]} (default: {field.default!r})",
        )


def load_console_settings(
    environ: Mapping[str, str], flags: argparse.Namespace | None = None
) -> ConsoleSettings:
    """Flags, then the environment, then defaults; the first bad value raises SettingsError."""
    values: dict[str, Any] = {}
    for field in fields(ConsoleSettings):
        raw = getattr(flags, f"setting_{field.name}", None) if flags is not None else None
        source = flag_name(field.name)
        if raw is None:
            raw, source = environ.get(env_name(field.name)), env_name(field.name)
        if raw is None:
            continue
        try:
            values[field.name] = _PARSERS[field.name](raw)
        except ValueError as error:
            raise SettingsError(source, str(error)) from None
    settings = ConsoleSettings(**values)
    trusted = {i.issuer for i in settings.jwt_issuers}
    for client in settings.console_clients:
        if client.issuer not in trusted:
            raise SettingsError(
                "AUTHZ_CONSOLE_CLIENTS",
                f"issuer {client.issuer!r} is not in AUTHZ_JWT_ISSUERS",
            )
    return settings
