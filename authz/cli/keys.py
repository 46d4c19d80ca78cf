"""`authz key create|list|revoke`."""

from __future__ import annotations

import argparse
from typing import TextIO

from authz.cli.output import CliError, emit, jsonable, key_dict, table
from authz.cli.parser import Commands, action_group
from authz.keys import mint_key
from authz.models import CLI_ACTOR
from authz.store.base import Store

_COLUMNS = ("id", "label", "mask", "created_at", "revoked_at", "last_used_at")


def add_commands(commands: Commands, common: argparse.ArgumentParser) -> None:
    keys = action_group(commands, "key", "manage API keys")
    create = keys.add_parser("create", parents=[common], help="create a key (secret shown once)")
    create.add_argument("--workspace", required=True)
    create.add_argument("--label", required=True)
    listing = keys.add_parser("list", parents=[common], help="list a workspace's keys (masked)")
    listing.add_argument("--workspace", required=True)
    revoke = keys.add_parser("revoke", parents=[common], help="revoke a key (live within 1 s)")
    revoke.add_argument("key_id")
    revoke.add_argument("--leaked", action="store_true", help="record the revocation as a leak")


async def key_command(store: Store, args: argparse.Namespace, out: TextIO) -> int:
    if args.action == "create":
        secret, new = mint_key(args.workspace, args.label)
        created = await store.create_key(new, actor=CLI_ACTOR)
        data = {
            "id": created.id,
            "workspace_id": created.workspace_id,
            "label": created.label,
            "mask": created.mask,
            "created_at": jsonable(created.created_at),
            "secret": secret,
        }
        emit(
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
        emit(out, args.json, rows, lambda: table(rows, _COLUMNS))
    else:
        reason = "leaked" if args.leaked else "revoked"
        revoked = await store.revoke_key(args.key_id, actor=CLI_ACTOR, reason=reason)
        emit(
            out,
            args.json,
            key_dict(revoked),
            lambda: f"revoked {revoked.id} ({revoked.mask}) at {jsonable(revoked.revoked_at)}",
        )
    return 0
