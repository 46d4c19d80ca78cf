"""`authz dev-issuer`: one command to a working local sign-in, loudly development-only, and never
written over or beside a real issuers configuration."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import pytest

from authz.cli import main
from authz.identity import Forbidden, IdentityVerifier, load_issuers
from tests.support.idp import TestIdp


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), pytest.MonkeyPatch.context() as patch:
        patch.delenv("AUTHZ_JWT_ISSUERS", raising=False)
        for name, value in (env or {}).items():
            patch.setenv(name, value)
        code = main(list(args), out=out)
    return code, out.getvalue(), err.getvalue()


async def test_init_then_token_signs_in_as_admin_or_member(tmp_path: Path) -> None:
    folder = tmp_path / "dev"
    code, out, err = run("dev-issuer", "init", "--dir", str(folder))
    assert code == 0, err
    assert "DEVELOPMENT ONLY" in err
    issuers_file = folder / "issuers.json"
    assert out == f"AUTHZ_JWT_ISSUERS={issuers_file.resolve()}\n"
    assert (folder / "dev-issuer-key.pem").stat().st_mode & 0o777 == 0o600
    # The printed setting is what the sidecar loads.
    setting = out.strip().partition("=")[2]
    verifier = IdentityVerifier(load_issuers(setting), jwks_timeout_s=1)

    code, admin, err = run(
        "dev-issuer", "token", "--dir", str(folder), "--workspace", "ws_a", "--role", "admin"
    )
    assert code == 0, err
    assert "DEVELOPMENT ONLY" in err
    identity = await verifier.verify(f"Bearer {admin.strip()}")
    identity.require_manager("ws_a")
    assert identity.issuer == "https://dev-issuer.authz.invalid"
    with pytest.raises(Forbidden):
        identity.require_manager("ws_b")

    _, member, _ = run(
        "dev-issuer", "token", "--dir", str(folder), "--workspace", "ws_a", "--role", "member"
    )
    with pytest.raises(Forbidden, match="permission to manage keys"):
        (await verifier.verify(f"Bearer {member.strip()}")).require_manager("ws_a")

    # init again keeps the key: tokens minted before still verify.
    assert run("dev-issuer", "init", "--dir", str(folder))[0] == 0
    again = IdentityVerifier(load_issuers(str(issuers_file)), jwks_timeout_s=1)
    await again.verify(f"Bearer {admin.strip()}")


def test_init_refuses_a_production_looking_config(tmp_path: Path) -> None:
    real = json.dumps([TestIdp().config(jwks_url="https://login.example.com/jwks.json")])
    code, out, err = run(
        "dev-issuer", "init", "--dir", str(tmp_path / "a"), env={"AUTHZ_JWT_ISSUERS": real}
    )
    assert (code, out) == (1, "")
    assert err.startswith(
        "authz: refusing to write a development issuer: AUTHZ_JWT_ISSUERS configures real "
        "sign-in providers"
    )
    assert not (tmp_path / "a").exists()

    production = tmp_path / "prod"
    production.mkdir()
    (production / "issuers.json").write_text(real)
    code, _, err = run("dev-issuer", "init", "--dir", str(production))
    assert code == 1
    assert f"refusing to write a development issuer: {production / 'issuers.json'}" in err
    assert (production / "issuers.json").read_text() == real
    assert not (production / "dev-issuer-key.pem").exists()


def test_token_needs_init_and_a_sane_ttl(tmp_path: Path) -> None:
    args = ("dev-issuer", "token", "--dir", str(tmp_path), "--workspace", "w", "--role", "admin")
    code, _, err = run(*args)
    assert (code, err) == (
        1,
        f"authz: no dev issuer in {tmp_path}: run `authz dev-issuer init` first\n",
    )
    assert run("dev-issuer", "init", "--dir", str(tmp_path))[0] == 0
    code, _, err = run(*args, "--ttl", "48h")
    assert (code, err) == (1, "authz: --ttl must be more than 0 s and at most 24h\n")
    assert os.path.exists(tmp_path / "issuers.json")
