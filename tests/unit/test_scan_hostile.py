"""`authz scan` on hostile input: a repository whose config names programs (gpg.program with a
signed commit, core.pager, core.fsmonitor, diff.external, a textconv driver) runs none of
them, a file name with ESC reaches the terminal escaped, and a huge line is read in pieces."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from authz.scan import MAX_PIECE, scan_paths
from tests.unit.test_scan import Cli, git

EVIL_NAME = "notes\x1b[2J\x1b[31mFORGED\x1b[0m\n.txt"


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(f"sqlite:///{tmp_path / 'authz.db'}")


def _tripwire(folder: Path, name: str, marks: Path) -> str:
    """A program that leaves a mark when anything runs it."""
    script = folder / name
    script.write_text(f"#!/bin/sh\ntouch '{marks / name}'\ncat\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def _signed_commit(repo: Path) -> None:
    """Rewrite HEAD as a commit carrying a (bogus) gpgsig header: git verifies it only if told."""
    raw = git(repo, "cat-file", "commit", "HEAD")
    head, _, message = raw.partition("\n\n")
    signature = "gpgsig -----BEGIN PGP SIGNATURE-----\n \n AAAA\n -----END PGP SIGNATURE-----"
    signed = f"{head}\n{signature}\n\n{message}\n"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "GIT_CONFIG_NOSYSTEM": "1"}
    sha = subprocess.run(
        ["git", "-C", str(repo), "hash-object", "-t", "commit", "-w", "--stdin"],
        input=signed,
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout.strip()
    git(repo, "update-ref", "refs/heads/main", sha)


@pytest.fixture
def hostile(tmp_path: Path, cli: Cli) -> tuple[Path, Path, dict[str, str]]:
    workspace = cli.json("workspace", "create", "acme")
    key = cli.json("key", "create", "--workspace", workspace["id"], "--label", "x")
    repo, tools, marks = tmp_path / "repo", tmp_path / "tools", tmp_path / "marks"
    for folder in (repo, tools, marks):
        folder.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / EVIL_NAME).write_text(f"key = {key['secret']}\n")
    (repo / ".gitattributes").write_text("* diff=evil\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "plant")
    _signed_commit(repo)
    for setting, program in (
        ("gpg.program", "gpg"),
        ("core.pager", "pager"),
        ("core.fsmonitor", "fsmonitor"),
        ("diff.external", "external-diff"),
        ("diff.evil.textconv", "textconv"),
        ("diff.evil.command", "diff-command"),
    ):
        git(repo, "config", setting, _tripwire(tools, program, marks))
    git(repo, "config", "log.showSignature", "true")
    return repo, marks, key


def test_the_fixture_is_hostile_to_a_plain_git_log(
    hostile: tuple[Path, Path, dict[str, str]],
) -> None:
    """Without the scanner's precautions, reading this history runs the repository's programs."""
    repo, marks, _ = hostile
    git(repo, "log", "-p", "--all")
    assert {p.name for p in marks.iterdir()} >= {"gpg", "textconv"}


def test_scanning_a_hostile_repository_runs_nothing_and_prints_escaped_text(
    cli: Cli, hostile: tuple[Path, Path, dict[str, str]]
) -> None:
    repo, marks, key = hostile
    code, out, err = cli.run("scan", "--git", str(repo))
    assert list(marks.iterdir()) == []  # no gpg, pager, fsmonitor, diff or textconv ran
    assert code == 1, err  # the planted key is found, and still active
    assert key["id"] in out
    assert "\x1b" not in out
    assert "notes\\x1b[2J\\x1b[31mFORGED\\x1b[0m\\x0a.txt:1" in out
    assert not any(line.startswith("FORGED") for line in out.splitlines())
    code, out, _ = cli.run("scan", "--git", str(repo), "--json")
    findings = json.loads(out)  # the signed commit, and the unsigned one it replaced (reflog)
    assert len(findings) == 2
    assert all(f["location"].endswith(f":{EVIL_NAME}:1") for f in findings)  # the real name
    assert "\x1b" not in out  # ... as a \\u001b escape
    assert list(marks.iterdir()) == []


def test_file_names_with_escapes_are_printed_escaped(cli: Cli, tmp_path: Path) -> None:
    workspace = cli.json("workspace", "create", "acme")
    key = cli.json("key", "create", "--workspace", workspace["id"], "--label", "x")
    (tmp_path / EVIL_NAME).write_text(f"{key['secret']}\n")
    code, out, _ = cli.run("scan", str(tmp_path / EVIL_NAME))
    assert code == 1
    assert "\x1b" not in out
    assert "\\x1b[2J" in out


def test_a_huge_line_is_read_in_bounded_pieces_and_a_key_across_pieces_is_found(
    tmp_path: Path,
) -> None:
    from authz.keys import generate_key, mask_key

    secret = generate_key()
    # The key straddles the first piece boundary, on line 2 of a file whose line 2 is 3 pieces.
    line = "x" * (MAX_PIECE - 20) + secret + "y" * (2 * MAX_PIECE)
    path = tmp_path / "bundle.min.js"
    path.write_text(f"first\n{line}\nlast {secret}\n")
    reads: list[int] = []
    real_open = Path.open

    def recording_open(self: Path, mode: str = "r", *args: object, **kwargs: object) -> io.IOBase:
        handle = real_open(self, mode, *args, **kwargs)  # type: ignore[call-overload]
        real_readline = handle.readline

        def readline(size: int = -1) -> bytes:
            data: bytes = real_readline(size)
            reads.append(len(data))
            return data

        handle.readline = readline
        return handle  # type: ignore[no-any-return]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Path, "open", recording_open)
        found = list(scan_paths([path]))
    assert {(s.mask, s.location) for s in found} == {
        (mask_key(secret), f"{path}:2"),
        (mask_key(secret), f"{path}:3"),
    }
    assert max(reads) <= MAX_PIECE
