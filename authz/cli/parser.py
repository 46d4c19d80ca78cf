"""The argument parser: one-line usage errors, and the flags several commands share."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, NoReturn, TypeAlias, TypeVar

from authz.settings import add_setting_flags

N = TypeVar("N", int, float)


class UsageProblem(Exception):
    """A command line that cannot run as given: one line naming the command's help, exit 2."""

    def __init__(self, message: str, *, command: str) -> None:
        super().__init__(message)
        self.command = command


def usage_line(message: str, command: str) -> str:
    """CONTRACT §5: `authz: error: <what> (see authz <command> --help)`, never the usage block."""
    return f"authz: error: {message} (see {command} --help)\n"


class Parser(argparse.ArgumentParser):
    """argparse, with usage errors printed as one line instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, usage_line(message, self.prog))

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: None = None
    ) -> argparse.Namespace:
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            # argparse reports these at the top level; point at the command they were given to.
            chosen = (getattr(parsed, "command", None), getattr(parsed, "action", None))
            command = " ".join([self.prog, *(c for c in chosen if c)])
            self.exit(2, usage_line(f"unrecognized arguments: {' '.join(extras)}", command))
        return parsed


def common_flags() -> argparse.ArgumentParser:
    """`--json` and `--database-url`: every data command takes them."""
    common = Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON")
    add_setting_flags(common, only=("database_url",))
    return common


def _number(raw: str, kind: type[N], what: str, *, ceiling: float, bounds: str) -> N:
    try:
        value = kind(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {raw!r}") from None
    if not 0 <= value < ceiling:
        raise argparse.ArgumentTypeError(f"expected {bounds}, got {raw}")
    return value


def non_negative(raw: str) -> int:
    """A count for a command-line flag: a whole number >= 0."""
    return _number(raw, int, "a whole number", ceiling=math.inf, bounds="a number >= 0")


def usd(raw: str) -> float:
    """An amount in USD for a command-line flag: finite, >= 0."""
    return _number(
        raw, float, "an amount in USD", ceiling=1e9, bounds="an amount in USD from 0 to 1e9"
    )


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(raw: str) -> timedelta:
    """A Go-style duration for a flag: `90s`, `15m`, `1h30m`, `7d`."""
    parts = _DURATION_PART.findall(raw)
    if not parts or "".join(n + u for n, u in parts) != raw.strip():
        raise argparse.ArgumentTypeError(f"expected a duration such as 30m, 12h or 7d, got {raw!r}")
    return timedelta(seconds=sum(float(n) * _UNITS[u] for n, u in parts))


Commands: TypeAlias = "argparse._SubParsersAction[Any]"


def action_group(commands: Commands, name: str, help_text: str) -> Commands:
    """A command with sub-actions (`authz key create|list|...`), parsed into `args.action`."""
    parent = commands.add_parser(name, help=help_text)
    actions: Commands = parent.add_subparsers(dest="action", required=True, parser_class=Parser)
    return actions
