"""`authz` commands on both stores: outputs, --json, one-line errors and exit codes."""

from __future__ import annotations

import io
import json
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
