"""`authz signing-key rotate|list`: the deployment secret that signs Check's reservations.

The secret itself is never printed: only its id and dates.
"""

from __future__ import annotations

import argparse
from typing import Any, TextIO

from authz.cli.output import emit, jsonable, table
from authz.cli.parser import Commands, action_group, duration
from authz.store.base import SigningKey, Store
from authz.usage.reservations import ROTATION_OVERLAP


def add_commands(commands: Commands, common: argparse.ArgumentParser) -> None:
    actions = action_group(commands, "signing-key", "the secret that signs reservations")
    rotate = actions.add_parser(
        "rotate",
        parents=[common],
        help="make a new signing secret; the old one verifies for --overlap more",
    )
    rotate.add_argument(
        "--overlap",
        type=duration,
        default=ROTATION_OVERLAP,
        help="how long reservations signed with the old secret still count (default 2h, "
        "at least the reservation lifetime of 1h plus a minute for replicas to reload)",
    )
    actions.add_parser("list", parents=[common], help="the signing keys in force (ids only)")


def _row(key: SigningKey) -> dict[str, Any]:
    data: dict[str, Any] = jsonable(
        {"id": key.id, "created_at": key.created_at, "retires_at": key.retires_at}
    )
    return data


async def signing_key_command(store: Store, args: argparse.Namespace, out: TextIO) -> int:
    if args.action == "rotate":
        key = await store.rotate_signing_key(overlap=args.overlap)
        emit(
            out,
            args.json,
            _row(key),
            lambda: (
                f"signing key {key.id} is now current; "
                f"the previous ones verify for {args.overlap} more"
            ),
        )
        return 0
    rows = [_row(k) for k in await store.signing_keys()]
    emit(out, args.json, rows, lambda: table(rows, ("id", "created_at", "retires_at")))
    return 0
