"""`authz scan PATH... | --git REPO`: leaked keys, and whether they still work."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any, TextIO

from authz.cli.output import CliError, emit, table
from authz.cli.parser import Commands, UsageProblem
from authz.scan import ScanError, Sighting, identify, scan_git, scan_paths
from authz.store.base import Store, utc_now
from authz.textsafe import printable


def add_commands(commands: Commands, common: argparse.ArgumentParser) -> None:
    scan = commands.add_parser(
        "scan",
        parents=[common],
        help="find API keys in files, logs and git history (exit 1 if one still works)",
    )
    scan.add_argument("paths", nargs="*", type=Path, metavar="PATH", help="file or folder")
    scan.add_argument(
        "--git", type=Path, action="append", default=[], metavar="REPO", help="every commit"
    )
    scan.set_defaults(validate=_require_targets)


def _require_targets(args: argparse.Namespace) -> None:
    if not args.paths and not args.git:
        raise UsageProblem("name a PATH to scan, or --git REPO", command="authz scan")


async def scan_command(store: Store, args: argparse.Namespace, out: TextIO) -> int:
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
    emit(out, args.json, rows, lambda: _report(rows, live))
    return 1 if live else 0


def _report(rows: list[dict[str, Any]], live: list[str]) -> str:
    if not rows:
        return "no API keys found"
    shown = [{**row, "active": "yes" if row["active"] else "no"} for row in rows]
    found = table(shown, ("active", "key_id", "workspace_id", "mask", "location"))
    if not live:
        return f"{found}\nno active keys among them"
    return (
        f"{found}\n{len(live)} key(s) still active: revoke now, then roll out replacements: "
        + "; ".join(f"authz key revoke {printable(key_id)} --leaked" for key_id in live)
    )
