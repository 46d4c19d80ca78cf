"""Sign-in: the full matrix against a loopback identity provider, and the issuer config."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from authz.cli import main as cli_main
from authz.identity import (
    Forbidden,
    IdentityVerifier,
    IssuerConfigError,
    SignInUnavailable,
    Unauthenticated,
    load_issuers,
)
from authz.keys import generate_key
from authz.settings import SettingsError, load_settings
from tests.support.idp import MANAGE, TestIdp, new_ec_key, new_rsa_key, public_jwk

WS = "ws_alpha"


@pytest.fixture(scope="module")
def keys_idp() -> TestIdp:
    """Key generation is the slow part: once per module."""
    return TestIdp()


@pytest.fixture
def idp(keys_idp: TestIdp) -> Iterator[TestIdp]:
    fresh = TestIdp(rsa_key=keys_idp.rsa_key, ec_key=keys_idp.ec_key)
    with fresh.serve():
        yield fresh


def verifier_for(*entries: dict[str, Any], timeout: float = 2.0) -> IdentityVerifier:
    return IdentityVerifier(load_issuers(json.dumps(list(entries))), jwks_timeout_s=timeout)


def bearer(token: str) -> str:
    return f"Bearer {token}"


# The matrix


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
async def test_valid_token_from_jwks_gives_the_identity(idp: TestIdp, alg: str) -> None:
    verifier = verifier_for(idp.config())
    identity = await verifier.verify(bearer(idp.token(alg=alg, workspaces=[WS, "ws_beta"])))
    assert identity.subject == "alice@example.com"
    assert identity.issuer == idp.issuer
    assert identity.workspaces == {WS, "ws_beta"}
    assert identity.may_manage_keys
    identity.require_manager(WS)


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer   ", "Basic dXNlcjpwYXNz"])
async def test_missing_token_is_unauthenticated(idp: TestIdp, header: str | None) -> None:
    with pytest.raises(Unauthenticated, match="sign in first"):
        await verifier_for(idp.config()).verify(header)


async def test_api_key_never_signs_in(idp: TestIdp) -> None:
    with pytest.raises(Unauthenticated, match="an API key cannot manage keys"):
        await verifier_for(idp.config()).verify(bearer(generate_key()))
    assert idp.fetches == 0


async def test_garbage_is_unauthenticated(idp: TestIdp) -> None:
    with pytest.raises(Unauthenticated, match="not a well-formed JWT"):
        await verifier_for(idp.config()).verify(bearer("not.a.jwt"))


async def test_bad_signature_is_unauthenticated(idp: TestIdp) -> None:
    forged = idp.token(workspaces=[WS], key=new_rsa_key(), kid="rsa-1")
    with pytest.raises(Unauthenticated, match="signature is invalid"):
        await verifier_for(idp.config()).verify(bearer(forged))


async def test_expired_token_is_unauthenticated(idp: TestIdp) -> None:
    # Past the default 30 s leeway.
    expired = idp.token(workspaces=[WS], expires_in=-120)
    with pytest.raises(Unauthenticated, match="expired"):
        await verifier_for(idp.config()).verify(bearer(expired))


async def test_wrong_audience_is_unauthenticated(idp: TestIdp) -> None:
    other = idp.token(workspaces=[WS], audience="some-other-api")
    with pytest.raises(Unauthenticated, match="another audience"):
        await verifier_for(idp.config()).verify(bearer(other))


async def test_unsupported_issuer_is_unauthenticated_and_says_so(idp: TestIdp) -> None:
    stranger = idp.token(workspaces=[WS], issuer="https://accounts.elsewhere.example")
    with pytest.raises(Unauthenticated, match="unsupported sign-in provider") as caught:
        await verifier_for(idp.config()).verify(bearer(stranger))
    assert "accounts.elsewhere.example" in str(caught.value)
    assert idp.fetches == 0


async def test_no_management_permission_is_forbidden(idp: TestIdp) -> None:
    token = idp.token(workspaces=[WS], permissions=["keys:read"])
    identity = await verifier_for(idp.config()).verify(bearer(token))
    with pytest.raises(Forbidden, match="permission to manage keys"):
        identity.require_manager(WS)


async def test_wrong_workspace_is_forbidden(idp: TestIdp) -> None:
    identity = await verifier_for(idp.config()).verify(bearer(idp.token(workspaces=["ws_beta"])))
    with pytest.raises(Forbidden, match=f"no access to workspace {WS}"):
        identity.require_manager(WS)


async def test_no_workspace_claim_is_forbidden(idp: TestIdp) -> None:
    token = idp.token(extra={"workspaces": None})
    identity = await verifier_for(idp.config()).verify(bearer(token))
    assert identity.workspaces == frozenset()
    with pytest.raises(Forbidden):
        identity.require_manager(WS)


async def test_scope_style_permission_string_and_single_workspace_string(idp: TestIdp) -> None:
    token = idp.token(extra={"workspaces": WS, "permissions": "openid keys:manage profile"})
    identity = await verifier_for(idp.config()).verify(bearer(token))
    identity.require_manager(WS)


# Algorithms and keys


async def test_symmetric_token_is_refused(idp: TestIdp) -> None:
    """HS256 signed with the public key as the secret: the classic algorithm confusion."""
    claims = jwt.decode(idp.token(workspaces=[WS]), options={"verify_signature": False})
    confused = jwt.encode(claims, "public-key-as-secret-0123456789abcdef", algorithm="HS256")
    with pytest.raises(Unauthenticated, match="algorithm 'HS256' is not accepted"):
        await verifier_for(idp.config()).verify(bearer(confused))


async def test_unsigned_token_is_refused(idp: TestIdp) -> None:
    claims = jwt.decode(idp.token(workspaces=[WS]), options={"verify_signature": False})
    unsigned = jwt.encode(claims, "", algorithm="none")
    with pytest.raises(Unauthenticated, match="not accepted"):
        await verifier_for(idp.config()).verify(bearer(unsigned))


async def test_header_alg_must_match_the_key(idp: TestIdp) -> None:
    """An EC-signed token claiming the RSA key's kid does not verify."""
    token = idp.token(workspaces=[WS], alg="ES256", kid="rsa-1")
    with pytest.raises(Unauthenticated):
        await verifier_for(idp.config()).verify(bearer(token))


async def test_unknown_kid_is_unauthenticated(idp: TestIdp) -> None:
    token = idp.token(workspaces=[WS], kid="rotated-away")
    with pytest.raises(Unauthenticated, match="unknown key"):
        await verifier_for(idp.config()).verify(bearer(token))


async def test_issuer_limited_to_es256_refuses_rs256(idp: TestIdp) -> None:
    verifier = verifier_for(idp.config(algorithms=["ES256"]))
    await verifier.verify(bearer(idp.token(workspaces=[WS], alg="ES256")))
    with pytest.raises(Unauthenticated, match="not accepted"):
        await verifier.verify(bearer(idp.token(workspaces=[WS], alg="RS256")))


async def test_static_keys_jwk_and_pem(keys_idp: TestIdp) -> None:
    pem = keys_idp.ec_key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    entry = keys_idp.config(keys=[public_jwk(keys_idp.rsa_key, "rsa-1"), pem.decode()])
    del entry["jwks_url"]
    verifier = verifier_for(entry)
    for alg in ("RS256", "ES256"):
        identity = await verifier.verify(bearer(keys_idp.token(workspaces=[WS], alg=alg)))
        identity.require_manager(WS)
    forged = keys_idp.token(workspaces=[WS], alg="ES256", key=new_ec_key())
    with pytest.raises(Unauthenticated, match="signature"):
        await verifier.verify(bearer(forged))


# JWKS fetching


async def test_jwks_is_fetched_once_and_cached(idp: TestIdp) -> None:
    verifier = verifier_for(idp.config())
    for _ in range(5):
        await verifier.verify(bearer(idp.token(workspaces=[WS])))
    assert idp.fetches == 1


async def test_unreachable_jwks_is_unavailable_not_unauthenticated(keys_idp: TestIdp) -> None:
    with TestIdp(rsa_key=keys_idp.rsa_key, ec_key=keys_idp.ec_key).serve() as gone:
        config = gone.config()
        token = gone.token(workspaces=[WS])
    with pytest.raises(SignInUnavailable):
        await verifier_for(config).verify(bearer(token))


async def test_hanging_jwks_times_out_without_blocking_the_loop(idp: TestIdp) -> None:
    import asyncio

    idp.hang.set()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    beat = asyncio.create_task(ticker())
    started = time.monotonic()
    try:
        with pytest.raises(SignInUnavailable):
            await verifier_for(idp.config(), timeout=0.3).verify(bearer(idp.token(workspaces=[WS])))
    finally:
        beat.cancel()
    assert time.monotonic() - started < 2
    assert ticks >= 10  # the event loop kept running while the fetch hung


async def test_tokens_are_never_logged(idp: TestIdp, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    verifier = verifier_for(idp.config())
    tokens = [
        idp.token(workspaces=[WS]),
        idp.token(workspaces=[WS], expires_in=-120),
        idp.token(workspaces=[WS], key=new_rsa_key()),
    ]
    await verifier.verify(bearer(tokens[0]))
    for token in tokens[1:]:
        with pytest.raises(Unauthenticated) as caught:
            await verifier.verify(bearer(token))
        assert token.split(".")[2] not in str(caught.value)
    idp.hang.set()
    with pytest.raises(SignInUnavailable):
        await verifier_for(idp.config(), timeout=0.2).verify(bearer(tokens[0]))
    for token in tokens:
        assert token not in caplog.text
        assert token.split(".")[2] not in caplog.text


# Configuration


def test_issuers_from_a_file_and_inline(tmp_path: Path, keys_idp: TestIdp) -> None:
    entry = keys_idp.config(jwks_url="https://idp.example/jwks.json")
    path = tmp_path / "issuers.json"
    path.write_text(json.dumps({"issuers": [entry]}))
    from_file = load_issuers(str(path))
    inline = load_issuers(json.dumps([entry]))
    assert from_file == inline
    assert from_file[0].issuer == keys_idp.issuer
    assert from_file[0].algorithms == ("RS256", "ES256")
    assert load_issuers("") == ()


GOOD = {
    "issuer": "https://idp.example",
    "jwks_url": "https://idp.example/jwks.json",
    "audience": "oais-keys",
    "workspace_claim": "workspaces",
    "permission_claim": "permissions",
    "manage_permission": MANAGE,
    "workspaces": [WS],
}
SECOND = {**GOOD, "issuer": "https://second.example", "workspaces": ["ws_beta"]}


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"issuer": "x"}', "expected a JSON list of issuers"),
        ("[1]", "issuer #1 is not a JSON object"),
        (json.dumps([{**GOOD, "audience": ""}]), "'audience' must be a non-empty string"),
        (json.dumps([{**GOOD, "keys": []}]), "give exactly one of 'jwks_url' or 'keys'"),
        (
            json.dumps([{k: v for k, v in GOOD.items() if k != "jwks_url"}]),
            "give exactly one of 'jwks_url' or 'keys'",
        ),
        (json.dumps([{**GOOD, "jwks_url": "ftp://x"}]), "'jwks_url' must be an http(s) URL"),
        (json.dumps([{**GOOD, "algorithms": ["HS256"]}]), "subset of RS256, ES256"),
        (json.dumps([{**GOOD, "leeway_s": 3600}]), "'leeway_s' must be a number"),
        (json.dumps([{**GOOD, "audiences": "x"}]), "unknown field 'audiences'"),
        (json.dumps([GOOD, GOOD]), "listed twice"),
        (
            json.dumps([{k: v for k, v in GOOD.items() if k != "workspaces"}]),
            "'workspaces' must be a non-empty list of the workspace ids this issuer may grant",
        ),
        (json.dumps([{**GOOD, "workspaces": []}]), "'workspaces' must be a non-empty list"),
        (json.dumps([{**GOOD, "workspaces": ["ws_a", ""]}]), "'workspaces' must be"),
        (json.dumps([{**GOOD, "workspaces": ["*"]}]), "'workspaces' must be"),
        (
            json.dumps([{**GOOD, "workspaces": "*"}, SECOND]),
            "is only for a single issuer; with several, list each issuer's workspace ids",
        ),
        (
            json.dumps([{**{k: v for k, v in GOOD.items() if k != "jwks_url"}, "keys": ["x"]}]),
            "key #1 is unusable",
        ),
        (
            json.dumps(
                [
                    {
                        **{k: v for k, v in GOOD.items() if k != "jwks_url"},
                        "keys": [{"kty": "oct", "k": "c2VjcmV0"}],
                    }
                ]
            ),
            "only RS256 and ES256 keys",
        ),
    ],
)
def test_bad_issuer_config_names_the_problem(document: str, message: str) -> None:
    with pytest.raises(IssuerConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_issuers(document)


def test_private_key_in_config_is_refused() -> None:
    private = public_jwk(new_ec_key(), "k")
    private["d"] = "AQAB"  # any private part makes it a private JWK
    entry = {**{k: v for k, v in GOOD.items() if k != "jwks_url"}, "keys": [private]}
    with pytest.raises(IssuerConfigError, match="key #1"):
        load_issuers(json.dumps([entry]))


def test_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(IssuerConfigError, match=f"cannot read {tmp_path / 'nope.json'}"):
        load_issuers(str(tmp_path / "nope.json"))


def test_bad_setting_names_the_variable() -> None:
    with pytest.raises(SettingsError, match="invalid setting AUTHZ_JWT_ISSUERS: not valid JSON"):
        load_settings({"AUTHZ_JWT_ISSUERS": "[{oops"})
    with pytest.raises(SettingsError, match="AUTHZ_JWKS_TIMEOUT_MS"):
        load_settings({"AUTHZ_JWKS_TIMEOUT_MS": "0"})
    settings = load_settings({"AUTHZ_JWT_ISSUERS": json.dumps([GOOD])})
    assert [i.issuer for i in settings.jwt_issuers] == ["https://idp.example"]


def test_serve_with_a_bad_issuer_file_exits_2_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bad = tmp_path / "issuers.json"
    bad.write_text(json.dumps([{**GOOD, "algorithms": ["HS256"]}]))
    monkeypatch.setenv("AUTHZ_JWT_ISSUERS", str(bad))
    assert cli_main(["serve"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        "authz: invalid setting AUTHZ_JWT_ISSUERS: issuer 'https://idp.example': 'algorithms' "
        f"must be a non-empty subset of RS256, ES256 (got {str(bad)!r})"
    ]


# Issuers bound to workspaces


def _two_issuers(a: TestIdp, b: TestIdp) -> IdentityVerifier:
    return verifier_for(a.config(workspaces=[WS]), b.config(workspaces=["ws_beta"]))


@pytest.fixture
def other_idp() -> Iterator[TestIdp]:
    other = TestIdp(issuer="https://idp.other-tenant.example")
    with other.serve():
        yield other


async def test_a_token_from_issuer_a_naming_workspace_b_is_forbidden(
    idp: TestIdp, other_idp: TestIdp
) -> None:
    verifier = _two_issuers(idp, other_idp)
    # Issuer A (bound to ws_alpha) signs a token that claims ws_beta, which belongs to B.
    greedy = await verifier.verify(bearer(idp.token(workspaces=[WS, "ws_beta"])))
    assert greedy.workspaces == {WS}
    greedy.require_manager(WS)
    with pytest.raises(Forbidden, match="no access to workspace ws_beta"):
        greedy.require_manager("ws_beta")
    # B's own tokens still manage B.
    own = await verifier.verify(bearer(other_idp.token(workspaces=["ws_beta"])))
    own.require_manager("ws_beta")


async def test_a_token_claiming_another_issuer_is_checked_with_that_issuers_keys(
    idp: TestIdp, other_idp: TestIdp
) -> None:
    """A's admin writes B's `iss` into a token signed with A's key: B's keys reject it."""
    verifier = _two_issuers(idp, other_idp)
    forged = idp.token(workspaces=["ws_beta"], issuer=other_idp.issuer, kid="rsa-1")
    with pytest.raises(Unauthenticated, match="signature is invalid"):
        await verifier.verify(bearer(forged))


def test_the_wildcard_binds_the_single_issuer_to_every_workspace(keys_idp: TestIdp) -> None:
    (single,) = load_issuers(json.dumps([keys_idp.config(workspaces="*")]))
    assert single.grantable(frozenset({WS, "ws_any"})) == {WS, "ws_any"}
    (bound,) = load_issuers(json.dumps([keys_idp.config(workspaces=[WS])]))
    assert bound.grantable(frozenset({WS, "ws_any"})) == {WS}
