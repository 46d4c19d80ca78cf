"""Console settings: one line naming the setting for each bad value."""

from __future__ import annotations

import json

import pytest

from authz.console.settings import load_console_settings
from authz.settings import SettingsError
from tests.support.idp import jwks_issuer

ISSUER = jwks_issuer("https://idp.example", workspaces=["ws"])


def test_defaults_and_a_configured_client() -> None:
    settings = load_console_settings(
        {
            "AUTHZ_JWT_ISSUERS": json.dumps([ISSUER]),
            "AUTHZ_CONSOLE_CLIENTS": json.dumps(
                [{"issuer": "https://idp.example", "client_id": "console"}]
            ),
        }
    )
    assert settings.console_cookie_secure is True
    assert settings.redirect_uri == "http://127.0.0.1:8080/console/auth/callback"
    assert settings.public_origin == "http://127.0.0.1:8080"
    (client,) = settings.console_clients
    assert (client.client_secret, client.scope, client.display_name) == (
        None,
        "openid",
        "idp.example",
    )


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        (
            {"AUTHZ_CONSOLE_CLIENTS": '[{"issuer": "https://other", "client_id": "c"}]'},
            "invalid setting AUTHZ_CONSOLE_CLIENTS: issuer 'https://other' is not in "
            "AUTHZ_JWT_ISSUERS",
        ),
        (
            {"AUTHZ_CONSOLE_CLIENTS": '[{"issuer": "https://idp.example"}]'},
            "invalid setting AUTHZ_CONSOLE_CLIENTS: client #1: 'issuer' and 'client_id' are "
            "required strings",
        ),
        (
            {"AUTHZ_CONSOLE_PUBLIC_URL": "https://example.com/console"},
            "invalid setting AUTHZ_CONSOLE_PUBLIC_URL: expected an http(s) URL ending in /",
        ),
        (
            {"AUTHZ_CONSOLE_COOKIE_SECURE": "maybe"},
            "invalid setting AUTHZ_CONSOLE_COOKIE_SECURE: expected true or false",
        ),
        ({"AUTHZ_CONSOLE_ADDR": "8090"}, "invalid setting AUTHZ_CONSOLE_ADDR: expected host:port"),
    ],
)
def test_bad_values_name_the_setting(environ: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as raised:
        load_console_settings({"AUTHZ_JWT_ISSUERS": json.dumps([ISSUER]), **environ})
    assert str(raised.value).startswith(message)
