"""`authz`: the one console script (CONTRACT §5).

Errors are one line on stderr and exit 1 (2 for usage and settings errors); no tracebacks
for anything a user can cause.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn, TextIO

from authz.cli_usage import (
    UsageError,
    add_usage_commands,
    iso_utc,
    price_command,
    usage_command,
    usd,
)
from authz.keys import mint_key
from authz.models import (
    CLI_ACTOR,
    ApiKey,
    AuditEntry,
    NewWorkspace,
    Workspace,
    WorkspaceUpdate,
)
from authz.scan import ScanError, Sighting, identify, scan_git, scan_paths
from authz.settings import Settings, SettingsError, add_setting_flags, load_settings
from authz.store import open_store
from authz.store.base import Store, StoreError, utc_now
from authz.store.common import InvalidInput


class CliError(Exception):
    """A failure the user can act on; printed as one line, exit 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"authz: error: {message}\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return iso_utc(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def workspace_dict(workspace: Workspace) -> dict[str, Any]:
    return _jsonable(asdict(workspace))  # type: ignore[no-any-return]


def key_dict(key: ApiKey) -> dict[str, Any]:
    data = asdict(key)
    data["active"] = key.active
    return _jsonable(data)  # type: ignore[no-any-return]


def _emit(out: TextIO, as_json: bool, data: Any, human: Callable[[], str]) -> None:
    if as_json:
        out.write(json.dumps(data, indent=2) + "\n")
    else:
        out.write(human() + "\n")


def _table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[("-" if row.get(c) is None else str(row.get(c))) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def _non_negative(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {raw!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {raw}")
    return value


def _add_limit_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rpm", type=_non_negative, help="requests per minute (0 = unlimited)")
    parser.add_argument("--tpm", type=_non_negative, help="tokens per minute (0 = unlimited)")
    parser.add_argument("--key-limit", type=_non_negative, help="maximum active keys")
    parser.add_argument(
        "--default-completion-tokens",
        type=_non_negative,
        help="tokens reserved when a request names no max_tokens",
    )
    parser.add_argument("--monthly-token-quota", type=_non_negative, help="tokens per UTC month")
    parser.add_argument("--monthly-spend-cap", type=usd, help="USD per UTC month")


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON")
    add_setting_flags(common, only=("database_url",))

    parser = _Parser(
        prog="authz", description="Envoy ext_authz sidecar for OpenAI-compatible APIs."
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = commands.add_parser("serve", help="run the sidecar")
    add_setting_flags(serve)
    commands.add_parser("migrate", parents=[common], help="apply the schema (idempotent)")

    workspace = commands.add_parser("workspace", help="manage workspaces")
    ws = workspace.add_subparsers(dest="action", required=True, parser_class=_Parser)
    create = ws.add_parser("create", parents=[common], help="create a workspace")
    create.add_argument("name")
    _add_limit_flags(create)
    ws.add_parser("list", parents=[common], help="list workspaces")
    show = ws.add_parser("show", parents=[common], help="show one workspace")
    show.add_argument("id")
    update = ws.add_parser("update", parents=[common], help="change limits (live within 1 s)")
    update.add_argument("id")
    update.add_argument("--name")
    _add_limit_flags(update)
    update.add_argument("--no-monthly-token-quota", action="store_true", help="remove the quota")
    update.add_argument("--no-monthly-spend-cap", action="store_true", help="remove the cap")

    key = commands.add_parser("key", help="manage API keys")
    keys = key.add_subparsers(dest="action", required=True, parser_class=_Parser)
    key_create = keys.add_parser(
        "create", parents=[common], help="create a key (secret shown once)"
    )
    key_create.add_argument("--workspace", required=True)
    key_create.add_argument("--label", required=True)
    key_list = keys.add_parser("list", parents=[common], help="list a workspace's keys (masked)")
    key_list.add_argument("--workspace", required=True)
    revoke = keys.add_parser("revoke", parents=[common], help="revoke a key (live within 1 s)")
    revoke.add_argument("key_id")
    revoke.add_argument("--leaked", action="store_true", help="record the revocation as a leak")
    scan = commands.add_parser(
        "scan",
        parents=[common],
        help="find API keys in files, logs and git history (exit 1 if one still works)",
    )
    scan.add_argument("paths", nargs="*", type=Path, metavar="PATH", help="file or folder")
    scan.add_argument(
        "--git", type=Path, action="append", default=[], metavar="REPO", help="every commit"
    )
    audit = commands.add_parser("audit", parents=[common], help="who did what to which key")
    audit.add_argument("--workspace", required=True)
    add_usage_commands(commands, common, _Parser)
    return parser


async def _with_store(settings: Settings, job: Callable[[Store], Awaitable[int]]) -> int:
    store = await open_store(settings.database_url, **settings.store_options(request_path=False))
    try:
        return await job(store)
    finally:
        await store.close()


async def _migrate(store: Store, args: argparse.Namespace, out: TextIO) -> int:
    applied = await store.migrate()
    _emit(
        out,
        args.json,
        {"applied": applied},
        lambda: f"applied migrations {applied}" if applied else "schema is up to date",
    )
    return 0


def _limits(args: argparse.Namespace) -> dict[str, Any]:
    values = {
        "rpm": args.rpm,
        "tpm": args.tpm,
        "key_limit": args.key_limit,
        "default_completion_tokens": args.default_completion_tokens,
        "monthly_token_quota": args.monthly_token_quota,
        "monthly_spend_cap_usd": args.monthly_spend_cap,
    }
    return {k: v for k, v in values.items() if v is not None}


_WS_COLUMNS = ("id", "name", "rpm", "tpm", "key_limit", "monthly_token_quota")
_KEY_COLUMNS = ("id", "label", "mask", "created_at", "revoked_at", "last_used_at")


def _show_workspace(workspace: Workspace) -> str:
    return "\n".join(
        f"{k}: {'-' if v is None else v}" for k, v in workspace_dict(workspace).items()
    )


async def _workspace(store: Store, args: argparse.Namespace, out: TextIO) -> int:
    if args.action == "create":
        created = await store.create_workspace(
            NewWorkspace(name=args.name, **_limits(args)), actor=CLI_ACTOR
        )
        _emit(out, args.json, workspace_dict(created), lambda: _show_workspace(created))
    elif args.action == "list":
        rows = [workspace_dict(w) for w in await store.list_workspaces()]
        _emit(out, args.json, rows, lambda: _table(rows, _WS_COLUMNS))
    elif args.action == "show":
        found = await store.get_workspace(args.id)
        if found is None:
            raise CliError(f"no workspace {args.id}")
        _emit(out, args.json, workspace_dict(found), lambda: _show_workspace(found))
    else:
        update = WorkspaceUpdate(
            name=args.name,
            clear_quota=args.no_monthly_token_quota,
            clear_spend_cap=args.no_monthly_spend_cap,
            **_limits(args),
        )
        updated = await store.update_workspace(args.id, update, actor=CLI_ACTOR)
        _emit(out, args.json, workspace_dict(updated), lambda: _show_workspace(updated))
    return 0


async def _key(store: Store, args: argparse.Namespace, out: TextIO) -> int:
    if args.action == "create":
        secret, new = mint_key(args.workspace, args.label)
        created = await store.create_key(new, actor=CLI_ACTOR)
        data = {
            "id": created.id,
            "workspace_id": created.workspace_id,
            "label": created.label,
            "mask": created.mask,
            "created_at": _jsonable(created.created_at),
            "secret": secret,
        }
        _emit(
            out,
            args.json,
            data,
            lambda: (
                f"key {created.id} ({created.label}) in workspace {created.workspace_id}\n"
                f"secret (shown once, store it now): {secret}"
            ),
        )
    elif args.action == "list":
        if await store.get_workspace(args.workspace) is None:
            raise CliError(f"no workspace {args.workspace}")
        rows = [key_dict(k) for k in await store.list_keys(args.workspace)]
        _emit(out, args.json, rows, lambda: _table(rows, _KEY_COLUMNS))
    else:
        reason = "leaked" if args.leaked else "revoked"
        revoked = await store.revoke_key(args.key_id, actor=CLI_ACTOR, reason=reason)
        _emit(
            out,
            args.json,
            key_dict(revoked),
            lambda: f"revoked {revoked.id} ({revoked.mask}) at {_jsonable(revoked.revoked_at)}",
        )
    return 0


async def _scan(store: Store, args: argparse.Namespace, out: TextIO) -> int:
    if not args.paths and not args.git:
        sys.stderr.write("authz: error: name a PATH to scan, or --git REPO\n")
        return 2

    def collect() -> list[Sighting]:
        found = list(scan_paths(args.paths))
        for repo in args.git:
            found.extend(scan_git(repo))
        return found

    try:
        sightings = await asyncio.to_thread(collect)
    except ScanError as error:
        raise CliError(str(error)) from None
    findings = await identify(sightings, store, now=utc_now())
    rows = [f.as_dict() for f in findings]
    live = sorted({f.key_id for f in findings if f.active and f.key_id})
    _emit(out, args.json, rows, lambda: _scan_report(rows, live))
    return 1 if live else 0


def _scan_report(rows: list[dict[str, Any]], live: list[str]) -> str:
    if not rows:
        return "no API keys found"
    shown = [{**row, "active": "yes" if row["active"] else "no"} for row in rows]
    table = _table(shown, ("active", "key_id", "workspace_id", "mask", "location"))
    if not live:
        return f"{table}\nno active keys among them"
    return (
        f"{table}\n{len(live)} key(s) still active: revoke now, then roll out replacements: "
        + "; ".join(f"authz key revoke {key_id} --leaked" for key_id in live)
    )


def audit_dict(entry: AuditEntry) -> dict[str, Any]:
    data: dict[str, Any] = _jsonable(asdict(entry))
    data["incident"] = entry.action == "key.revoke" and entry.detail == "leaked"
    return data


async def _audit(store: Store, args: argparse.Namespace, out: TextIO) -> int:
    if await store.get_workspace(args.workspace) is None:
        raise CliError(f"no workspace {args.workspace}")
    rows = [audit_dict(e) for e in await store.list_audit(args.workspace)]
    _emit(out, args.json, rows, lambda: _audit_report(rows))
    return 0


def _audit_report(rows: list[dict[str, Any]]) -> str:
    shown = [
        {
            **row,
            "action": row["action"] + (" INCIDENT" if row["incident"] else ""),
            "actor": row["actor_subject"]
            + (f" ({row['actor_issuer']})" if row["actor_issuer"] else f" ({row['actor_kind']})"),
            "address": row["actor_address"],
        }
        for row in rows
    ]
    table = _table(shown, ("at", "action", "key_id", "actor", "address", "detail"))
    incidents = [
        f"INCIDENT: {r['key_id']} revoked as leaked at {r['at']} by {r['actor']}"
        for r in shown
        if r["incident"]
    ]
    return "\n".join([table, *incidents])


_HANDLERS: dict[str, Callable[[Store, argparse.Namespace, TextIO], Awaitable[int]]] = {
    "migrate": _migrate,
    "workspace": _workspace,
    "key": _key,
    "scan": _scan,
    "audit": _audit,
    "usage": usage_command,
    "price": price_command,
}


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(os.environ, args)
    except SettingsError as error:
        sys.stderr.write(f"authz: {error}\n")
        return 2
    if args.command == "serve":
        from authz.app import StartupError, run

        try:
            return run(settings)
        except SettingsError as error:
            sys.stderr.write(f"authz: {error}\n")
            return 2
        except (StartupError, StoreError) as error:
            sys.stderr.write(f"authz: {error}\n")
            return 1
    handler = _HANDLERS[args.command]
    try:
        return asyncio.run(_with_store(settings, lambda store: handler(store, args, out)))
    except (CliError, StoreError, InvalidInput, UsageError) as error:
        sys.stderr.write(f"authz: {error}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
