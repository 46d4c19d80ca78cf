"""`authz audit --workspace ID`: who did what to which key, and leak incidents."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any, TextIO

from authz.cli.output import CliError, emit, jsonable, table
from authz.cli.parser import Commands
from authz.models import AuditEntry
from authz.store.base import Store
from authz.textsafe import printable


def add_commands(commands: Commands, common: argparse.ArgumentParser) -> None:
    audit = commands.add_parser("audit", parents=[common], help="who did what to which key")
    audit.add_argument("--workspace", required=True)


def audit_dict(entry: AuditEntry) -> dict[str, Any]:
    data: dict[str, Any] = jsonable(asdict(entry))
    data["incident"] = entry.action == "key.revoke" and entry.detail == "leaked"
    return data


async def audit_command(store: Store, args: argparse.Namespace, out: TextIO) -> int:
    if await store.get_workspace(args.workspace) is None:
        raise CliError(f"no workspace {args.workspace}")
    rows = [audit_dict(e) for e in await store.list_audit(args.workspace)]
    emit(out, args.json, rows, lambda: _report(rows))
    return 0


def _report(rows: list[dict[str, Any]]) -> str:
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
    found = table(shown, ("at", "action", "key_id", "actor", "address", "detail"))
    incidents = [
        f"INCIDENT: {printable(r['key_id'])} revoked as leaked at {r['at']} "
        f"by {printable(r['actor'])}"
        for r in shown
        if r["incident"]
    ]
    return "\n".join([found, *incidents])
