"""`authz scan`: planted keys in a temporary git repository's history and in a log file.

The database is the embedded SQLite file; everything runs through the real command line.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from authz.cli import main
from authz.keys import BASE62, checksum, generate_key, hash_key, mask_key
from authz.scan import ScanError, _DiffReader, scan_git, scan_paths


def look_alike() -> str:
    """Key-shaped, with a wrong checksum: must never be reported."""
    key = generate_key()
    body = key[8:48]
    wrong = next(c for c in (checksum(body)[:5] + ch for ch in BASE62) if c != checksum(body))
    return "sk-oais_" + body + wrong


@dataclass
class Cli:
    database_url: str

    def run(self, *args: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main([*args, "--database-url", self.database_url], out=out)
        return code, out.getvalue(), err.getvalue()

    def json(self, *args: str) -> Any:
        code, out, err = self.run(*args, "--json")
        assert code == 0, err
        return json.loads(out)


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(f"sqlite:///{tmp_path / 'authz.db'}")


@dataclass
class Keys:
    live: dict[str, Any]
    revoked: dict[str, Any]
    unknown: str
    workspace_id: str


@pytest.fixture
def keys(cli: Cli) -> Keys:
    workspace = cli.json("workspace", "create", "acme")
    live = cli.json("key", "create", "--workspace", workspace["id"], "--label", "payments")
    revoked = cli.json("key", "create", "--workspace", workspace["id"], "--label", "old")
    cli.json("key", "revoke", revoked["id"])
    return Keys(live, revoked, generate_key(), workspace["id"])


def git(repo: Path, *args: str) -> str:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    done = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, env=env, check=True
    )
    return done.stdout.strip()


def commit_all(repo: Path, message: str) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")[:12]


@dataclass
class History:
    repo: Path
    added: str
    branch: str
    merge: str
    odd: str


@pytest.fixture
def history(tmp_path: Path, keys: Keys) -> History:
    """main: add settings.py (live key), delete it; branch: a revoked key; an evil merge."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "README.md").write_text(f"Keys look like {look_alike()}\n")
    (repo / "config").mkdir()
    (repo / "config" / "settings.py").write_text(
        f'DEBUG = True\nOPENAI_API_KEY = "{keys.live["secret"]}"\nOTHER = "{look_alike()}"\n'
    )
    added = commit_all(repo, "add settings")
    (repo / "config" / "settings.py").unlink()
    commit_all(repo, "remove the key")

    git(repo, "checkout", "-q", "-b", "feature", "HEAD~1")
    (repo / "deploy.env").write_text(f"A=1\nB=2\nKEY={keys.revoked['secret']}\n")
    branch = commit_all(repo, "deploy env")

    git(repo, "checkout", "-q", "main")
    git(repo, "merge", "-q", "--no-commit", "--no-ff", "feature")
    (repo / "merged.txt").write_text(f"resolved by hand\ntoken {keys.unknown}\n")
    merge = commit_all(repo, "merge with an extra file")

    (repo / 'we"ird é.txt').write_text(f"x {keys.live['secret']}\n")
    odd = commit_all(repo, "odd name")
    git(repo, "rm", "-q", 'we"ird é.txt')
    commit_all(repo, "remove odd")
    return History(repo, added, branch, merge, odd)


def test_scan_git_history(cli: Cli, keys: Keys, history: History) -> None:
    assert keys.live["secret"] not in (history.repo / "README.md").read_text()
    code, out, err = cli.run("scan", "--git", str(history.repo), "--json")
    assert code == 1, err
    findings = sorted(json.loads(out), key=lambda f: f["location"])
    expected = [
        {
            "mask": keys.live["mask"],
            "location": f"{history.added}:config/settings.py:2",
            "key_id": keys.live["id"],
            "workspace_id": keys.workspace_id,
            "active": True,
        },
        {
            "mask": keys.revoked["mask"],
            "location": f"{history.branch}:deploy.env:3",
            "key_id": keys.revoked["id"],
            "workspace_id": keys.workspace_id,
            "active": False,
        },
        {
            "mask": mask_key(keys.unknown),
            "location": f"{history.merge}:merged.txt:2",
            "key_id": None,
            "workspace_id": None,
            "active": False,
        },
        {
            "mask": keys.live["mask"],
            "location": f'{history.odd}:we"ird é.txt:1',
            "key_id": keys.live["id"],
            "workspace_id": keys.workspace_id,
            "active": True,
        },
    ]
    assert findings == sorted(expected, key=lambda f: f["location"])
    for secret in (keys.live["secret"], keys.revoked["secret"], keys.unknown):
        assert secret not in out + err


def test_scan_log_file_and_folder(cli: Cli, keys: Keys, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    (logs / "nested").mkdir(parents=True)
    (logs / "app.log").write_text(
        "\n".join(
            [
                "INFO start",
                f"DEBUG headers={{'authorization': 'Bearer {keys.live['secret']}'}}",
                f"WARN look-alike {look_alike()} and {look_alike()}",
                "\x00\xff binary noise",
                f"ERROR again {keys.revoked['secret']} and {keys.live['secret']}",
            ]
        )
        + "\n"
    )
    (logs / "nested" / "ci.log").write_bytes(b"\xfe\xff" + keys.unknown.encode() + b"\n")
    code, out, err = cli.run("scan", str(logs), "--json")
    assert code == 1, err
    found = {(f["location"], f["key_id"], f["active"]) for f in json.loads(out)}
    app, ci = logs / "app.log", logs / "nested" / "ci.log"
    assert found == {
        (f"{app}:2", keys.live["id"], True),
        (f"{app}:5", keys.revoked["id"], False),
        (f"{app}:5", keys.live["id"], True),
        (f"{ci}:1", None, False),
    }
    code, human, _ = cli.run("scan", str(logs))
    assert code == 1
    assert f"authz key revoke {keys.live['id']} --leaked" in human
    for text in (out, human):
        for secret in (keys.live["secret"], keys.revoked["secret"], keys.unknown):
            assert secret not in text


def test_no_false_positives_and_exit_zero(cli: Cli, keys: Keys, tmp_path: Path) -> None:
    decoys = tmp_path / "decoys.txt"
    secret = keys.live["secret"]
    decoys.write_text(
        "\n".join(
            [
                *(look_alike() for _ in range(20)),
                secret[:-1],  # truncated
                secret[:20] + secret[21:] + "x",  # one character changed... and moved
                "sk-oais_" + "A" * 45,  # too short
            ]
        )
    )
    code, out, err = cli.run("scan", str(decoys), "--json")
    assert (code, json.loads(out), err) == (0, [], "")
    assert cli.run("scan", str(decoys))[1] == "no API keys found\n"


def test_revoked_only_exits_zero(cli: Cli, keys: Keys, tmp_path: Path) -> None:
    log = tmp_path / "old.log"
    log.write_text(f"leaked {keys.revoked['secret']}\n")
    code, out, _ = cli.run("scan", str(log))
    assert code == 0
    assert "no active keys among them" in out


def test_errors_are_one_line_exit_1(cli: Cli, tmp_path: Path) -> None:
    code, _, err = cli.run("scan", str(tmp_path / "missing.log"))
    assert (code, err.count("\n")) == (1, 1)
    assert "no such file or folder" in err
    plain = tmp_path / "plain"
    plain.mkdir()
    code, _, err = cli.run("scan", "--git", str(plain))
    assert (code, err.count("\n")) == (1, 1)
    assert "git log failed" in err
    code, _, err = cli.run("scan")
    assert code == 2
    assert "name a PATH" in err


def test_sightings_hold_no_secret(tmp_path: Path) -> None:
    secret = generate_key()
    log = tmp_path / "a.log"
    log.write_text(f"x {secret}\n")
    (sighting,) = list(scan_paths([log]))
    assert sighting.key_hash == hash_key(secret)
    assert secret not in repr(sighting)


def test_diff_reader_counts_new_file_lines_in_plain_and_combined_hunks() -> None:
    secret = generate_key()
    reader = _DiffReader()
    lines = [
        "commit " + "a" * 40,
        "diff --git a/f b/f",
        "--- a/f",
        "+++ b/f",
        "@@ -10,2 +10,3 @@ def x():",
        "-old",
        "+++ looks like a header but is content " + secret,
        " context",
        "+" + secret,
        "commit " + "b" * 40,
        "diff --cc m",
        "--- a/m",
        "+++ b/m",
        "@@@ -1,1 -1,1 +1,3 @@@",
        "- from the first parent only",
        "  in both",
        "++" + secret,
        " +" + secret,
    ]
    found = [s.location for line in lines for s in reader.feed(line)]
    assert found == [
        "aaaaaaaaaaaa:f:10",
        "aaaaaaaaaaaa:f:12",
        "bbbbbbbbbbbb:m:2",
        "bbbbbbbbbbbb:m:3",
    ]


def test_scan_git_outside_a_repository_raises(tmp_path: Path) -> None:
    with pytest.raises(ScanError, match="git log failed"):
        list(scan_git(tmp_path))


def test_leak_response_scan_revoke_leaked_then_audit_shows_the_incident(
    cli: Cli, keys: Keys, tmp_path: Path
) -> None:
    log = tmp_path / "ci.log"
    log.write_text(f"export OPENAI_API_KEY={keys.live['secret']}\n")
    assert cli.run("scan", str(log))[0] == 1
    cli.json("key", "revoke", keys.live["id"], "--leaked")
    assert cli.run("scan", str(log))[0] == 0

    entries = cli.json("audit", "--workspace", keys.workspace_id)
    incidents = [e for e in entries if e["incident"]]
    assert [(e["action"], e["key_id"], e["detail"]) for e in incidents] == [
        ("key.revoke", keys.live["id"], "leaked")
    ]
    ordinary = next(
        e for e in entries if e["key_id"] == keys.revoked["id"] and e["action"] == "key.revoke"
    )
    assert ordinary["incident"] is False
    assert (ordinary["actor_kind"], ordinary["actor_subject"]) == ("operator", "cli")

    code, human, _ = cli.run("audit", "--workspace", keys.workspace_id)
    assert code == 0
    assert f"INCIDENT: {keys.live['id']} revoked as leaked at " in human
    assert human.count("INCIDENT") == 2  # the table row and the summary line

    code, _, err = cli.run("audit", "--workspace", "ws_missing")
    assert (code, err) == (1, "authz: no workspace ws_missing\n")
