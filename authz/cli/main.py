"""`authz`: the one console script (CONTRACT §5); parses, loads settings, runs one command.

Errors are one line on stderr and exit 1 (2 for usage and settings errors); no tracebacks
for anything a user can cause.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TextIO

from authz.cli import audit, devissuer, keys, scan, signing, usage, workspaces
from authz.cli.output import CliError, emit
from authz.cli.parser import Commands, Parser, UsageProblem, common_flags, usage_line
from authz.settings import Settings, SettingsError, add_setting_flags, load_settings
from authz.store import open_store
from authz.store.base import Store, StoreError
from authz.store.common import InvalidInput
from authz.textsafe import printable

Handler = Callable[[Store, argparse.Namespace, TextIO], Awaitable[int]]


def build_parser() -> argparse.ArgumentParser:
    common = common_flags()
    parser = Parser(prog="authz", description="Envoy ext_authz sidecar for OpenAI-compatible APIs.")
    commands: Commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    serve = commands.add_parser("serve", help="run the sidecar")
    add_setting_flags(serve)
    commands.add_parser("migrate", parents=[common], help="apply the schema (idempotent)")
    workspaces.add_commands(commands, common)
    keys.add_commands(commands, common)
    scan.add_commands(commands, common)
    audit.add_commands(commands, common)
    usage.add_commands(commands, common)
    devissuer.add_commands(commands, common)
    signing.add_commands(commands, common)
    return parser


async def _migrate(store: Store, args: argparse.Namespace, out: TextIO) -> int:
    applied = await store.migrate()
    emit(
        out,
        args.json,
        {"applied": applied},
        lambda: f"applied migrations {applied}" if applied else "schema is up to date",
    )
    return 0


_HANDLERS: dict[str, Handler] = {
    "migrate": _migrate,
    "workspace": workspaces.workspace_command,
    "key": keys.key_command,
    "scan": scan.scan_command,
    "audit": audit.audit_command,
    "usage": usage.usage_command,
    "price": usage.price_command,
    "signing-key": signing.signing_key_command,
}


async def _with_store(
    settings: Settings, handler: Handler, args: argparse.Namespace, out: TextIO
) -> int:
    store = await open_store(
        settings.database_url, migrate_embedded=True, **settings.store_options(request_path=False)
    )
    try:
        return await handler(store, args, out)
    finally:
        await store.close()


def _fail(error: Exception) -> None:
    """One line on stderr; messages may quote names and labels, so they are escaped too."""
    sys.stderr.write(f"authz: {printable(error)}\n")


def _serve(settings: Settings) -> int:
    from authz.workers import run_workers

    return run_workers(settings, _serve_one)


def _serve_one(settings: Settings) -> int:
    """One sidecar process (the only one, or one of AUTHZ_WORKERS)."""
    from authz.app import StartupError, run

    try:
        return run(settings)
    except SettingsError as error:
        _fail(error)
        return 2
    except (StartupError, StoreError) as error:
        _fail(error)
        return 1


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(os.environ, args)
    except SettingsError as error:
        _fail(error)
        return 2
    if args.command == "serve":
        return _serve(settings)
    try:
        if args.command == "dev-issuer":
            return devissuer.dev_issuer_command(settings, args, out)
        # Checks argparse cannot express run before anything opens the database.
        getattr(args, "validate", lambda _: None)(args)
        return asyncio.run(_with_store(settings, _HANDLERS[args.command], args, out))
    except UsageProblem as error:
        sys.stderr.write(usage_line(str(error), error.command))
        return 2
    except (CliError, StoreError, InvalidInput) as error:
        _fail(error)
        return 1
