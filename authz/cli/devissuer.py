"""`authz dev-issuer init|token`: a local sign-in provider for trying the key API. DEVELOPMENT ONLY.

`init` writes an EC P-256 key pair and an issuers file that trusts its public half (no JWKS
server needed) and prints the `AUTHZ_JWT_ISSUERS=...` line to start the sidecar with; `token`
mints short-lived ES256 tokens for a workspace and role. Anyone holding the private key can
manage keys in any workspace of a sidecar that trusts it, so both commands say so loudly, and
`init` refuses to touch an issuers file or an `AUTHZ_JWT_ISSUERS` that names real providers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, TextIO

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from authz.cli.output import CliError
from authz.cli.parser import Commands, action_group, duration
from authz.identity import IssuerConfig, IssuerConfigError, load_issuers
from authz.settings import Settings

DEV_ISSUER = "https://dev-issuer.authz.invalid"
"""`.invalid` never resolves (RFC 2606): no real provider can have this name."""
AUDIENCE = "oais-keys"
ROLES = {"admin": ["keys:manage"], "member": []}
KEY_FILE = "dev-issuer-key.pem"
ISSUERS_FILE = "issuers.json"
MAX_TTL = timedelta(hours=24)
WARNING = (
    "authz: DEVELOPMENT ONLY: the dev issuer lets whoever holds {key} manage keys in every "
    "workspace of a sidecar that trusts it; never use it in production\n"
)


def add_commands(commands: Commands, common: argparse.ArgumentParser) -> None:
    actions = action_group(
        commands, "dev-issuer", "DEVELOPMENT ONLY: a local sign-in provider for the key API"
    )
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument(
        "--dir",
        type=Path,
        default=Path(".authz-dev-issuer"),
        help="where the key pair and issuers file live (default: ./.authz-dev-issuer)",
    )
    actions.add_parser(
        "init", parents=[where], help="write a key pair and issuers file; print AUTHZ_JWT_ISSUERS"
    )
    token = actions.add_parser("token", parents=[where], help="print a sign-in token (a JWT)")
    token.add_argument("--workspace", required=True, action="append", help="workspace id")
    token.add_argument("--role", required=True, choices=sorted(ROLES))
    token.add_argument("--ttl", type=duration, default=timedelta(hours=1), help="default 1h")
    token.add_argument("--subject", default="dev@localhost", help="the token's sub")


def _issuer_entry(public_pem: str) -> dict[str, Any]:
    return {
        "issuer": DEV_ISSUER,
        "keys": [public_pem],
        "algorithms": ["ES256"],
        "audience": AUDIENCE,
        "workspace_claim": "workspaces",
        "permission_claim": "permissions",
        "manage_permission": "keys:manage",
        "workspaces": "*",  # the only issuer in its file: a single-tenant development setup
    }


def _refuse_production(configured: tuple[IssuerConfig, ...], issuers_file: Path) -> None:
    """Never overwrite, or join, the configuration of real identity providers."""
    sources = [("AUTHZ_JWT_ISSUERS", configured)]
    if issuers_file.exists():
        try:
            sources.append((str(issuers_file), load_issuers(str(issuers_file))))
        except IssuerConfigError:
            raise CliError(f"refusing to overwrite {issuers_file}: not a dev issuer file") from None
    for source, issuers in sources:
        if any(i.issuer != DEV_ISSUER for i in issuers):
            raise CliError(
                f"refusing to write a development issuer: {source} configures real sign-in "
                "providers; use a fresh --dir, without AUTHZ_JWT_ISSUERS set"
            )


def _init(settings: Settings, args: argparse.Namespace, out: TextIO) -> None:
    folder: Path = args.dir
    issuers_file, key_file = folder / ISSUERS_FILE, folder / KEY_FILE
    _refuse_production(settings.jwt_issuers, issuers_file)
    folder.mkdir(parents=True, exist_ok=True)
    if key_file.exists():
        private = _private_key(key_file)
    else:
        private = ec.generate_private_key(ec.SECP256R1())
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        descriptor = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(pem)
    public_pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )
    issuers_file.write_text(json.dumps([_issuer_entry(public_pem)], indent=2) + "\n")
    sys.stderr.write(WARNING.format(key=key_file))
    out.write(f"AUTHZ_JWT_ISSUERS={issuers_file.resolve()}\n")


def _private_key(key_file: Path) -> ec.EllipticCurvePrivateKey:
    try:
        loaded = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except (OSError, ValueError) as error:
        raise CliError(f"cannot read the dev issuer key {key_file}: {error}") from None
    if not isinstance(loaded, ec.EllipticCurvePrivateKey):
        raise CliError(f"{key_file} is not a dev issuer key")
    return loaded


def _token(settings: Settings, args: argparse.Namespace, out: TextIO) -> None:
    key_file: Path = args.dir / KEY_FILE
    if not key_file.exists():
        raise CliError(f"no dev issuer in {args.dir}: run `authz dev-issuer init` first")
    if not timedelta(0) < args.ttl <= MAX_TTL:
        raise CliError("--ttl must be more than 0 s and at most 24h")
    now = int(time.time())
    claims = {
        "iss": DEV_ISSUER,
        "aud": AUDIENCE,
        "sub": args.subject,
        "iat": now,
        "exp": now + int(args.ttl.total_seconds()),
        "workspaces": args.workspace,
        "permissions": ROLES[args.role],
    }
    sys.stderr.write(WARNING.format(key=key_file))
    out.write(jwt.encode(claims, _private_key(key_file), algorithm="ES256") + "\n")


def dev_issuer_command(settings: Settings, args: argparse.Namespace, out: TextIO) -> int:
    (_init if args.action == "init" else _token)(settings, args, out)
    return 0
