"""`authz` commands on both stores: outputs, --json, one-line errors and exit codes."""

from __future__ import annotations

import io
import json
from datetime import datetime, timedelta
from typing import Any

import pytest

from authz.cli import main
from authz.keys import is_well_formed

pytestmark = pytest.mark.integration


class Cli:
    def __init__(self, database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
        self.database_url = database_url
        self.capsys = capsys

    def __call__(self, *args: str, code: int = 0) -> Any:
        out = io.StringIO()
        self.capsys.readouterr()
        exit_code = main([*args, "--database-url", self.database_url, "--json"], out=out)
        err = self.capsys.readouterr().err
        assert exit_code == code, err
        return json.loads(out.getvalue()) if code == 0 else err


@pytest.fixture
def cli(database_url: str, capsys: pytest.CaptureFixture[str]) -> Cli:
    runner = Cli(database_url, capsys)
    runner("migrate")
    return runner


def test_workspace_lifecycle(cli: Cli) -> None:
    created = cli("workspace", "create", "acme", "--rpm", "5", "--tpm", "1000", "--key-limit", "2")
    assert {k: created[k] for k in ("name", "rpm", "tpm", "key_limit")} == {
        "name": "acme",
        "rpm": 5,
        "tpm": 1000,
        "key_limit": 2,
    }
    assert cli("workspace", "list")[0]["id"] == created["id"]
    updated = cli("workspace", "update", created["id"], "--rpm", "9")
    assert (updated["rpm"], updated["tpm"]) == (9, 1000)
    assert cli("workspace", "show", created["id"]) == updated


def test_workspace_enforcement_flag(cli: Cli) -> None:
    assert cli("workspace", "create", "plain")["enforcement"] == "enforce"
    created = cli("workspace", "create", "acme", "--enforcement", "shadow")
    assert created["enforcement"] == "shadow"
    updated = cli("workspace", "update", created["id"], "--enforcement", "enforce")
    assert updated["enforcement"] == "enforce"
    assert cli("workspace", "update", created["id"], "--rpm", "3")["enforcement"] == "enforce"
    audit = cli("audit", "--workspace", created["id"])
    assert "enforcement shadow \u2192 enforce" in [entry["detail"] for entry in audit]


def test_unknown_enforcement_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["workspace", "update", "ws_x", "--enforcement", "dry-run"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("authz: error: argument --enforcement: invalid choice: 'dry-run'")
    assert err.count("\n") == 1


def test_key_secret_only_at_creation_and_limit_message(cli: Cli) -> None:
    workspace = cli("workspace", "create", "acme", "--key-limit", "1")
    key = cli("key", "create", "--workspace", workspace["id"], "--label", "svc")
    assert set(key) == {"id", "workspace_id", "label", "mask", "created_at", "secret"}
    assert is_well_formed(key["secret"])
    assert key["mask"] == key["secret"][:5] + "*" * 10 + key["secret"][-4:]
    listed = cli("key", "list", "--workspace", workspace["id"])
    assert "secret" not in json.dumps(listed)
    assert key["secret"] not in json.dumps(listed)
    assert {"id", "label", "mask", "created_at", "revoked_at", "last_used_at"} <= set(listed[0])
    err = cli("key", "create", "--workspace", workspace["id"], "--label", "two", code=1)
    assert err == (
        "authz: key limit reached: revoke an unused key before generating a replacement\n"
    )
    revoked = cli("key", "revoke", key["id"])
    assert revoked["revoked_at"] is not None
    assert revoked["id"] == key["id"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("workspace", "show", "ws_nope"), "authz: no workspace ws_nope\n"),
        (("key", "revoke", "key_nope"), "authz: no key key_nope\n"),
        (("key", "list", "--workspace", "ws_nope"), "authz: no workspace ws_nope\n"),
        (
            ("key", "create", "--workspace", "ws_nope", "--label", "x"),
            "authz: no workspace ws_nope\n",
        ),
        (("workspace", "create", " "), "authz: workspace name must not be empty\n"),
    ],
)
def test_errors_are_one_line_exit_1(cli: Cli, args: tuple[str, ...], message: str) -> None:
    assert cli(*args, code=1) == message


def test_usage_errors_exit_2(cli: Cli) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["workspace", "create", "x", "--rpm", "-3"])
    assert exit_info.value.code == 2


def test_bad_database_url_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["workspace", "list", "--database-url", "mysql://x"]) == 2
    assert capsys.readouterr().err.startswith("authz: invalid setting --database-url:")


LIMIT_LINE = "authz: key limit reached: revoke an unused key before generating a replacement\n"


def test_key_rotate_replaces_in_the_same_workspace_and_audits(cli: Cli) -> None:
    workspace = cli("workspace", "create", "acme")
    old = cli("key", "create", "--workspace", workspace["id"], "--label", "payments")
    rotated = cli("key", "rotate", old["id"])
    assert set(rotated) == {"replacement", "secret", "previous"}
    new = rotated["replacement"]
    assert is_well_formed(rotated["secret"])
    assert rotated["secret"] != old["secret"]
    assert new["workspace_id"] == workspace["id"]
    assert new["label"].startswith("payments (rotated ")
    assert new["mask"] == rotated["secret"][:5] + "*" * 10 + rotated["secret"][-4:]
    # Without --grace the old key keeps working until someone revokes it.
    assert rotated["previous"]["active"] is True
    assert rotated["previous"]["expires_at"] is None
    listed = cli("key", "list", "--workspace", workspace["id"])
    assert rotated["secret"] not in json.dumps(listed)
    assert {k["id"] for k in listed} == {old["id"], new["id"]}
    audit = cli("audit", "--workspace", workspace["id"])
    actions = {(e["action"], e["key_id"], e["actor_subject"]) for e in audit}
    assert ("key.rotate", old["id"], "cli") in actions
    assert ("key.create", new["id"], "cli") in actions


def test_key_rotate_with_grace_and_label(cli: Cli) -> None:
    workspace = cli("workspace", "create", "acme")
    old = cli("key", "create", "--workspace", workspace["id"], "--label", "batch")
    rotated = cli("key", "rotate", old["id"], "--grace", "1h30m", "--label", "batch v2")
    assert rotated["replacement"]["label"] == "batch v2"
    created = datetime.fromisoformat(rotated["replacement"]["created_at"])
    deadline = datetime.fromisoformat(rotated["previous"]["expires_at"])
    assert timedelta(hours=1, minutes=29) < deadline - created <= timedelta(hours=1, minutes=31)
    assert cli("key", "rotate", old["id"], "--grace", "31d", code=1) == (
        "authz: --grace must be more than 0 s and at most 30 days\n"
    )


def test_key_rotate_at_the_limit_works_as_the_api_does(cli: Cli) -> None:
    """The same store rule as the key API's RotateKey: the key being replaced does not count,
    so one rotation at the limit succeeds, and nothing goes further over."""
    workspace = cli("workspace", "create", "acme", "--key-limit", "2")
    keys = [
        cli("key", "create", "--workspace", workspace["id"], "--label", f"k{i}") for i in (1, 2)
    ]
    first = cli("key", "rotate", keys[0]["id"])
    assert cli("key", "rotate", keys[1]["id"], code=1) == LIMIT_LINE
    assert cli("key", "rotate", first["replacement"]["id"], code=1) == LIMIT_LINE
    cli("key", "revoke", keys[0]["id"])
    cli("key", "rotate", keys[1]["id"])
    active = [k for k in cli("key", "list", "--workspace", workspace["id"]) if k["active"]]
    assert len(active) == 3


def test_key_rotate_refusals(cli: Cli) -> None:
    assert cli("key", "rotate", "key_nope", code=1) == "authz: no key key_nope\n"
    workspace = cli("workspace", "create", "acme")
    old = cli("key", "create", "--workspace", workspace["id"], "--label", "x")
    cli("key", "revoke", old["id"])
    assert cli("key", "rotate", old["id"], code=1).startswith("authz: ")


def test_signing_key_rotate_keeps_the_old_key_for_the_overlap_and_never_prints_a_secret(
    cli: Cli,
) -> None:
    (first,) = cli("signing-key", "list")
    assert set(first) == {"id", "created_at", "retires_at"}
    assert first["retires_at"] is None
    rotated = cli("signing-key", "rotate", "--overlap", "90m")
    listed = cli("signing-key", "list")
    assert [k["id"] for k in listed] == [rotated["id"], first["id"]]
    retires = datetime.fromisoformat(listed[1]["retires_at"].replace("Z", "+00:00"))
    created = datetime.fromisoformat(rotated["created_at"].replace("Z", "+00:00"))
    assert retires - created == timedelta(minutes=90)
    assert "secret" not in json.dumps(listed)
