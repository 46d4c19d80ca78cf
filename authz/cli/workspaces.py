"""`authz workspace create|list|show|update`."""

from __future__ import annotations

import argparse
from typing import Any, TextIO

from authz.cli.output import CliError, emit, table, workspace_dict
from authz.cli.parser import Commands, action_group, non_negative, usd
from authz.models import (
    CLI_ACTOR,
    Enforcement,
    NewWorkspace,
    StreamingUsage,
    Workspace,
    WorkspaceUpdate,
)
from authz.store.base import Store
from authz.textsafe import printable

_COLUMNS = ("id", "name", "rpm", "tpm", "key_limit", "monthly_token_quota", "enforcement")


def _add_limit_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rpm", type=non_negative, help="requests per minute (0 = unlimited)")
    parser.add_argument("--tpm", type=non_negative, help="tokens per minute (0 = unlimited)")
    parser.add_argument("--key-limit", type=non_negative, help="maximum active keys")
    parser.add_argument(
        "--default-completion-tokens",
        type=non_negative,
        help="tokens reserved when a request names no max_tokens",
    )
    parser.add_argument("--monthly-token-quota", type=non_negative, help="tokens per UTC month")
    parser.add_argument("--monthly-spend-cap", type=usd, help="USD per UTC month")
    parser.add_argument(
        "--enforcement",
        choices=[mode.value for mode in Enforcement],
        help="enforce the limits (the default), or shadow: evaluate and count, but admit",
    )
    parser.add_argument(
        "--streaming-usage",
        type=StreamingUsage,
        choices=list(StreamingUsage),
        help="a stream without stream_options.include_usage: estimate (charge its reservation, "
        "the default) or require (refuse it with 400)",
    )


def add_commands(commands: Commands, common: argparse.ArgumentParser) -> None:
    ws = action_group(commands, "workspace", "manage workspaces")
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


def _limits(args: argparse.Namespace) -> dict[str, Any]:
    values = {
        "rpm": args.rpm,
        "tpm": args.tpm,
        "key_limit": args.key_limit,
        "default_completion_tokens": args.default_completion_tokens,
        "monthly_token_quota": args.monthly_token_quota,
        "monthly_spend_cap_usd": args.monthly_spend_cap,
        "enforcement": None if args.enforcement is None else Enforcement(args.enforcement),
        "streaming_usage": args.streaming_usage,
    }
    return {k: v for k, v in values.items() if v is not None}


def _show(workspace: Workspace) -> str:
    return "\n".join(
        f"{k}: {'-' if v is None else printable(v)}" for k, v in workspace_dict(workspace).items()
    )


async def workspace_command(store: Store, args: argparse.Namespace, out: TextIO) -> int:
    if args.action == "create":
        created = await store.create_workspace(
            NewWorkspace(name=args.name, **_limits(args)), actor=CLI_ACTOR
        )
        emit(out, args.json, workspace_dict(created), lambda: _show(created))
    elif args.action == "list":
        rows = [workspace_dict(w) for w in await store.list_workspaces()]
        emit(out, args.json, rows, lambda: table(rows, _COLUMNS))
    elif args.action == "show":
        found = await store.get_workspace(args.id)
        if found is None:
            raise CliError(f"no workspace {args.id}")
        emit(out, args.json, workspace_dict(found), lambda: _show(found))
    else:
        update = WorkspaceUpdate(
            name=args.name,
            clear_quota=args.no_monthly_token_quota,
            clear_spend_cap=args.no_monthly_spend_cap,
            **_limits(args),
        )
        updated = await store.update_workspace(args.id, update, actor=CLI_ACTOR)
        emit(out, args.json, workspace_dict(updated), lambda: _show(updated))
    return 0
