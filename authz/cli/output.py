"""How every command prints: JSON or a human table, times in UTC, one-line errors."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any, TextIO

from authz.models import ApiKey, Workspace
from authz.textsafe import printable


class CliError(Exception):
    """A failure the user can act on; printed as one line, exit 1."""


def iso_utc(moment: datetime) -> str:
    """`2026-11-27T09:13:06.654980Z`: how every command prints a time."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def jsonable(value: Any) -> Any:
    """`value` with datetimes as ISO UTC strings, ready for json.dumps."""
    if isinstance(value, datetime):
        return iso_utc(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def workspace_dict(workspace: Workspace) -> dict[str, Any]:
    return jsonable(asdict(workspace))  # type: ignore[no-any-return]


def key_dict(key: ApiKey) -> dict[str, Any]:
    data = asdict(key)
    data["active"] = key.active
    return jsonable(data)  # type: ignore[no-any-return]


def emit(out: TextIO, as_json: bool, data: Any, human: Callable[[], str]) -> None:
    """Print `data` as JSON with --json, else the human rendering."""
    if as_json:
        out.write(json.dumps(data, indent=2) + "\n")
    else:
        out.write(human() + "\n")


def table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    """Rows as aligned columns under upper-case headers; `(none)` when empty. Every cell is
    escaped for the terminal (`printable`): names, labels and file names are untrusted."""
    if not rows:
        return "(none)"
    cells = [[("-" if row.get(c) is None else printable(row[c])) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)
