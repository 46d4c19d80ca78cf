"""docs/keys.md's local recipe through real Envoy: `authz dev-issuer init`, the sidecar started
with the printed AUTHZ_JWT_ISSUERS, a token from `authz dev-issuer token`, and every key API
call of the recipe answered."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import build_stack
from tests.support.stack import Stack, authz_cli

pytestmark = pytest.mark.e2e


def dev_issuer(folder: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "authz", "dev-issuer", *args, "--dir", str(folder)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        check=True,
        timeout=60,
    )
    assert "DEVELOPMENT ONLY" in done.stderr
    return done.stdout.strip()


@pytest.fixture(scope="module")
def dev_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Path]]:
    log_dir = tmp_path_factory.mktemp("dev-issuer")
    name, _, value = dev_issuer(log_dir / "issuer", "init").partition("=")
    assert name == "AUTHZ_JWT_ISSUERS"
    for stack in build_stack(log_dir, f"sqlite:///{log_dir / 'authz.db'}", {name: value}):
        yield stack, log_dir / "issuer"


def call(stack: Stack, token: str, path: str, body: dict[str, Any] | None = None) -> Any:
    answer = stack.request(
        path,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        body=None if body is None else json.dumps(body).encode(),
    )
    return answer.status, answer.json() if answer.body else None


def test_every_call_of_the_recipe_works_with_a_dev_token(dev_stack: tuple[Stack, Path]) -> None:
    stack, issuer = dev_stack
    workspace = authz_cli(stack.database_url, "workspace", "create", "console-demo")["id"]
    token = dev_issuer(issuer, "token", "--workspace", workspace, "--role", "admin")
    api = f"/keys/v1/workspaces/{workspace}"

    status, created = call(stack, token, f"{api}/keys", {"label": "billing-worker"})
    assert status == 200, created
    key_id = created["key"]["id"]
    assert created["secret"].startswith("sk-oais_")
    for path, body in (
        (f"{api}/keys", None),
        (f"{api}/keys/{key_id}", None),
        (f"{api}/keys/{key_id}:rotate", {"grace_period": "3600s"}),
        (f"{api}/keys/{key_id}:revoke", {"leaked": False}),
        (api, None),
        (f"{api}/usage?since=2026-11-01T00:00:00Z", None),
    ):
        status, answer = call(stack, token, path, body)
        assert status == 200, (path, answer)

    member = dev_issuer(issuer, "token", "--workspace", workspace, "--role", "member")
    status, answer = call(stack, member, f"{api}/keys", {"label": "x"})
    assert status == 403, answer
    other = dev_issuer(issuer, "token", "--workspace", "ws_other", "--role", "admin")
    assert call(stack, other, f"{api}/keys")[0] == 403
