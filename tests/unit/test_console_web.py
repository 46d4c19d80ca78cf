"""The console's HTTP guards: headers, sign-in failures, expiry, CSRF and sign-out.

The app runs in-process on a real socket (aiohttp's TestServer); nothing here reaches the key
API or a provider, so their clients point at a closed port.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import aiohttp
import grpc
import pytest
from aiohttp.test_utils import TestClient, TestServer

from authz.console.keyapi import KeyApi
from authz.console.oidc import OidcFlow
from authz.console.sessions import SessionStore
from authz.console.settings import load_console_settings
from authz.console.web import Console, build_app
from authz.identity import Identity, IdentityVerifier
from tests.support.clock import FakeClock
from tests.support.idp import jwks_issuer
from tests.support.procs import free_port

T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
ORIGIN = "http://127.0.0.1:8080"
ISSUER = jwks_issuer("https://idp.example", workspaces=["ws"])
MEMBER = Identity(
    subject="ana", issuer="https://idp.example", workspaces=frozenset({"ws"}), may_manage_keys=True
)


@dataclass
class App:
    client: TestClient[aiohttp.web.Request, aiohttp.web.Application]
    sessions: SessionStore
    clock: FakeClock[float]

    def sign_in(self, identity: Identity = MEMBER) -> str:
        session = self.sessions.create(
            access_token="jwt", identity=identity, token_expires_at=T0 + timedelta(minutes=30)
        )
        self.client.session.cookie_jar.update_cookies({"oais-console": session.id})
        return session.csrf_token


@pytest.fixture
async def app() -> AsyncIterator[App]:
    settings = load_console_settings(
        {
            "AUTHZ_JWT_ISSUERS": json.dumps([ISSUER]),
            "AUTHZ_CONSOLE_CLIENTS": json.dumps(
                [{"issuer": "https://idp.example", "client_id": "console"}]
            ),
            "AUTHZ_CONSOLE_COOKIE_SECURE": "false",
        }
    )
    clock = FakeClock(T0.timestamp())
    sessions = SessionStore(clock=clock.utc, max_age=timedelta(hours=8))
    async with (
        aiohttp.ClientSession() as http,
        grpc.aio.insecure_channel(f"127.0.0.1:{free_port()}") as channel,
    ):
        console = Console(
            settings=settings,
            sessions=sessions,
            flow=OidcFlow(http=http, clients={}, redirect_uri="unused", timeout_s=1),
            keys=KeyApi(channel, timeout_s=1),
            verifier=IdentityVerifier(settings.jwt_issuers, jwks_timeout_s=1),
            clock=clock.utc,
        )
        async with TestClient(TestServer(build_app(console))) as client:
            yield App(client, sessions, clock)


async def test_pages_carry_a_strict_content_security_policy(app: App) -> None:
    answer = await app.client.get("/console/w/ws/keys")
    assert answer.status == 200
    policy = answer.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy
    assert "'unsafe-inline'" not in policy
    assert "frame-ancestors 'none'" in policy
    assert answer.headers["X-Frame-Options"] == "DENY"
    assert '<script type="module" src="/console/static/app.js">' in await answer.text()


async def test_an_unsupported_provider_gets_its_page(app: App) -> None:
    answer = await app.client.get(
        "/console/auth/login", params={"provider": "https://evil.example"}, allow_redirects=False
    )
    assert answer.status == 302
    assert answer.headers["Location"] == "/console/signin?error=unsupported_provider"


async def test_a_callback_without_our_state_cookie_is_refused(app: App) -> None:
    state, _ = app.sessions.start_login("https://idp.example")
    answer = await app.client.get(
        "/console/auth/callback", params={"state": state, "code": "c"}, allow_redirects=False
    )
    assert answer.headers["Location"] == "/console/signin?error=signin_failed"


async def test_signed_out_and_expired_sessions_are_told_apart(app: App) -> None:
    answer = await app.client.get("/console/api/session")
    assert (answer.status, (await answer.json())["error"]) == (401, "signed_out")
    app.sign_in()
    answer = await app.client.get("/console/api/session")
    assert answer.status == 200
    assert (await answer.json())["workspaces"] == ["ws"]
    assert "access_token" not in await answer.text()
    assert "jwt" not in await answer.text()
    app.clock.now = (T0 + timedelta(minutes=30)).timestamp()
    answer = await app.client.get("/console/api/session")
    assert (answer.status, (await answer.json())["error"]) == (401, "session_expired")


@pytest.mark.parametrize(
    ("headers", "allowed"),
    [({}, False), ({"Origin": "https://evil.example"}, False), ({"Origin": ORIGIN}, True)],
)
async def test_state_changes_need_the_csrf_token_from_our_origin(
    app: App, headers: dict[str, str], allowed: bool
) -> None:
    csrf = app.sign_in()
    sent = {**headers, **({"X-CSRF-Token": csrf} if headers else {})}
    answer = await app.client.post("/console/auth/logout", json={}, headers=sent)
    assert answer.status == (200 if allowed else 403)
    still = await app.client.get("/console/api/session")
    assert still.status == (401 if allowed else 200)


async def test_a_label_is_required_before_the_key_api_is_asked(app: App) -> None:
    csrf = app.sign_in()
    answer = await app.client.post(
        "/console/api/w/ws/keys", json={"label": "  "}, headers={"X-CSRF-Token": csrf}
    )
    assert answer.status == 400
    assert (await answer.json())["message"] == "enter a Label that names the workload"


async def test_an_unreachable_key_api_is_a_503_not_a_crash(app: App) -> None:
    app.sign_in()
    answer = await app.client.get("/console/api/w/ws/keys")
    assert answer.status == 503
    assert (await answer.json())["error"] == "unavailable"
