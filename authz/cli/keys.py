"""`authz key create|list|revoke|rotate`."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from typing import Any, TextIO

from authz.cli.output import CliError, emit, jsonable, key_dict, table
from authz.cli.parser import Commands, action_group, duration
from authz.keys import mint_key
from authz.models import CLI_ACTOR
from authz.rotation import Rotation, grace_deadline, rotate_key
from authz.store.base import Store, utc_now
from authz.textsafe import printable

_COLUMNS = ("id", "label", "mask", "created_at", "revoked_at", "last_used_at")
_SHOWN_ONCE = "secret (shown once, store it now)"


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
    rotate = keys.add_parser(
        "rotate",
        parents=[common],
        help="create a replacement (secret shown once); the old key works until --grace ends",
    )
    rotate.add_argument("key_id")
    rotate.add_argument("--label", help='default: "<old label> (rotated YYYY-MM-DD)"')
    rotate.add_argument(
        "--grace",
        type=duration,
        metavar="DURATION",
        help="how long the old key keeps working, e.g. 1h or 7d (at most 30d); "
        "default: until you revoke it",
    )


async def _create(store: Store, args: argparse.Namespace, out: TextIO) -> None:
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
            f"key {created.id} ({printable(created.label)}) in workspace {created.workspace_id}\n"
            f"{_SHOWN_ONCE}: {secret}"
        ),
    )


async def _list(store: Store, args: argparse.Namespace, out: TextIO) -> None:
    if await store.get_workspace(args.workspace) is None:
        raise CliError(f"no workspace {args.workspace}")
    rows = [key_dict(k) for k in await store.list_keys(args.workspace)]
    emit(out, args.json, rows, lambda: table(rows, _COLUMNS))


async def _revoke(store: Store, args: argparse.Namespace, out: TextIO) -> None:
    reason = "leaked" if args.leaked else "revoked"
    revoked = await store.revoke_key(args.key_id, actor=CLI_ACTOR, reason=reason)
    emit(
        out,
        args.json,
        key_dict(revoked),
        lambda: f"revoked {revoked.id} ({revoked.mask}) at {jsonable(revoked.revoked_at)}",
    )


async def _rotate(store: Store, args: argparse.Namespace, out: TextIO) -> None:
    old = await store.get_key(args.key_id)
    if old is None:
        raise CliError(f"no key {args.key_id}")
    now = utc_now()
    rotation = await rotate_key(
        store,
        old,
        label=args.label,
        deadline=grace_deadline(args.grace, now, name="--grace"),
        actor=CLI_ACTOR,
        now=now,
    )
    data = {
        "replacement": key_dict(rotation.replacement),
        "secret": rotation.secret,
        "previous": key_dict(rotation.previous),
    }
    emit(out, args.json, data, lambda: _rotated(rotation))


def _rotated(rotation: Rotation) -> str:
    old, new = rotation.previous, rotation.replacement
    until = (
        f"until {jsonable(old.expires_at)}"
        if old.expires_at is not None
        else f"until you revoke it: authz key revoke {old.id}"
    )
    return (
        f"key {new.id} ({printable(new.label)}) in workspace {new.workspace_id} "
        f"replaces {old.id}\n"
        f"{old.id} ({old.mask}) keeps working {until}\n"
        f"{_SHOWN_ONCE}: {rotation.secret}"
    )


_ACTIONS: dict[str, Callable[[Store, argparse.Namespace, TextIO], Awaitable[Any]]] = {
    "create": _create,
    "list": _list,
    "revoke": _revoke,
    "rotate": _rotate,
}


async def key_command(store: Store, args: argparse.Namespace, out: TextIO) -> int:
    await _ACTIONS[args.action](store, args, out)
    return 0
