"""CONTRACT §5: a usage error is one line, `authz: error: <what> (see authz <command> --help)`,
exit 2, on every subcommand; never argparse's usage block."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator

import pytest

from authz.cli import main
from authz.cli.main import build_parser

ONE_LINE = re.compile(r"authz: error: [^\n]+ \(see (authz[a-z -]*) --help\)\n")


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    """Every command path: `("key",)`, `("key", "create")`, ..."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield (*path, name)
                yield from _commands(child, (*path, name))


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_info:
        code = exit_info.code  # type: ignore[assignment]
    captured = capsys.readouterr()
    assert code == 2, (argv, captured.err)
    assert captured.out == ""
    return captured.err


ALL = sorted(_commands(build_parser()))


def test_every_command_is_covered() -> None:
    assert ("key", "create") in ALL
    assert ("scan",) in ALL
    assert len(ALL) >= 16


@pytest.mark.parametrize("path", ALL, ids=" ".join)
def test_an_unknown_flag_is_one_line_naming_the_command(
    path: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    err = _usage_error([*path, "--no-such-flag"], capsys)
    match = ONE_LINE.fullmatch(err)
    assert match, err
    assert "usage:" not in err
    # The help it points at is the command's own (or its group's, before a sub-action is chosen).
    assert match.group(1) in {"authz " + " ".join(path), "authz " + path[0]}


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], "authz: error: the following arguments are required: command (see authz --help)\n"),
        (
            ["workspace", "create", "x", "--rpm", "-3"],
            "authz: error: argument --rpm: expected a number >= 0, got -3 "
            "(see authz workspace create --help)\n",
        ),
        (
            ["key", "list"],
            "authz: error: the following arguments are required: --workspace "
            "(see authz key list --help)\n",
        ),
        (
            ["key", "list", "--workspace", "ws_x", "--bogus"],
            "authz: error: unrecognized arguments: --bogus (see authz key list --help)\n",
        ),
        (
            ["key", "rotate", "key_x", "--grace", "soon"],
            "authz: error: argument --grace: expected a duration such as 30m, 12h or 7d, "
            "got 'soon' (see authz key rotate --help)\n",
        ),
        (
            ["scan"],
            "authz: error: name a PATH to scan, or --git REPO (see authz scan --help)\n",
        ),
        (
            ["usage", "--workspace", "ws_x", "--month", "2026"],
            "authz: error: argument --month: expected YYYY-MM, got '2026' "
            "(see authz usage --help)\n",
        ),
    ],
)
def test_usage_errors_say_what_and_where(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _usage_error(argv, capsys) == expected
