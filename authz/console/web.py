"""The console's HTTP side (aiohttp): sign-in, the session cookie, the JSON the pages read.

Every page is the same static shell (static/index.html) whose ES modules render it; every
state change is a POST carrying the session's CSRF token in a header, from our own origin.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jwt
from aiohttp import web

from authz.console.keyapi import KeyApi, KeyApiError
from authz.console.oidc import OidcFlow, ProviderError
from authz.console.sessions import Lookup, Session, SessionStore
from authz.console.settings import ConsoleSettings
from authz.console.usage import RANGES, hourly, month_totals, observed, per_key, window
from authz.identity import IdentityVerifier, SignInUnavailable, Unauthenticated
from authz.usage.periods import period_bounds, period_of

log = logging.getLogger("authz.console")

STATIC = Path(__file__).parent / "static"
LOGIN_COOKIE = "oais-console-login"
CSRF_HEADER = "X-CSRF-Token"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def content_security_policy() -> str:
    """No inline script or style, nothing from elsewhere, never framed."""
    return (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    )


@web.middleware
async def security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as error:
        response = error
    response.headers["Content-Security-Policy"] = content_security_policy()
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "no-referrer"
    if request.path.startswith(("/console/api/", "/console/auth/")):
        response.headers["Cache-Control"] = "no-store"
    if isinstance(response, web.HTTPException) and response.status >= 300:
        raise response
    return response


def _problem(status: int, error: str, message: str) -> web.Response:
    return web.json_response({"error": error, "message": message}, status=status)


@dataclass(frozen=True, slots=True)
class Console:
    """The handlers, with their collaborators handed in by the composition root."""

    settings: ConsoleSettings
    sessions: SessionStore
    flow: OidcFlow
    keys: KeyApi
    verifier: IdentityVerifier
    clock: Callable[[], datetime]

    @property
    def cookie(self) -> str:
        # __Host- binds the cookie to this origin, path /, Secure only: unavailable on http.
        return "__Host-oais-console" if self.settings.console_cookie_secure else "oais-console"

    # Sign-in

    async def login(self, request: web.Request) -> web.StreamResponse:
        issuer = request.query.get("provider", "")
        if issuer not in {c.issuer for c in self.settings.console_clients}:
            raise _to_signin("unsupported_provider")
        state, verifier = self.sessions.start_login(issuer)
        try:
            url = await self.flow.authorization_url(issuer, state=state, code_verifier=verifier)
        except ProviderError as error:
            log.warning("console: sign-in with %s failed: %s", issuer, error)
            raise _to_signin("provider_unavailable") from None
        redirect = web.HTTPFound(url)
        redirect.set_cookie(
            LOGIN_COOKIE,
            state,
            path="/console/auth/",
            httponly=True,
            secure=self.settings.console_cookie_secure,
            samesite="Lax",  # sent on the provider's top-level redirect back to us
            max_age=600,
        )
        raise redirect

    async def callback(self, request: web.Request) -> web.StreamResponse:
        state = request.query.get("state", "")
        bound = request.cookies.get(LOGIN_COOKIE, "")
        pending = self.sessions.finish_login(state) if state else None
        if pending is None or not hmac.compare_digest(state, bound):
            raise _to_signin("signin_failed")
        if "code" not in request.query:
            raise _to_signin("signin_failed")
        try:
            token = await self.flow.redeem(
                pending.issuer, code=request.query["code"], code_verifier=pending.code_verifier
            )
            identity = await self.verifier.verify(f"Bearer {token}")
        except (ProviderError, SignInUnavailable) as error:
            log.warning("console: sign-in with %s failed: %s", pending.issuer, error)
            raise _to_signin("provider_unavailable") from None
        except Unauthenticated as error:
            log.info("console: sign-in refused: %s", error)
            unsupported = str(error).startswith("unsupported sign-in provider")
            raise _to_signin("unsupported_provider" if unsupported else "signin_failed") from None
        expires = jwt.decode(token, options={"verify_signature": False})["exp"]
        session = self.sessions.create(
            access_token=token,
            identity=identity,
            token_expires_at=datetime.fromtimestamp(expires, UTC),
        )
        log.info("console: %s signed in with %s", identity.subject, identity.issuer)
        redirect = web.HTTPFound("/console/")
        redirect.del_cookie(LOGIN_COOKIE, path="/console/auth/")
        redirect.set_cookie(
            self.cookie,
            session.id,
            path="/",
            httponly=True,
            secure=self.settings.console_cookie_secure,
            samesite="Strict",
        )
        raise redirect

    async def logout(self, request: web.Request) -> web.StreamResponse:
        session = self._member(request, changes_state=True)
        self.sessions.end(session.id)
        response = web.json_response({"signed_out": True})
        response.del_cookie(self.cookie, path="/")
        return response

    # The page's JSON

    async def providers(self, _request: web.Request) -> web.StreamResponse:
        clients = self.settings.console_clients
        return web.json_response([{"id": c.issuer, "name": c.display_name} for c in clients])

    async def session(self, request: web.Request) -> web.StreamResponse:
        session = self._member(request)
        identity = session.identity
        return web.json_response(
            {
                "subject": identity.subject,
                "issuer": identity.issuer,
                "workspaces": sorted(identity.workspaces),
                "may_manage_keys": identity.may_manage_keys,
                "csrf_token": session.csrf_token,
                "expires_at": session.expires_at.isoformat(),
            }
        )

    async def list_keys(self, request: web.Request) -> web.StreamResponse:
        session, workspace = self._member(request), request.match_info["workspace"]
        client = _client(request)
        now = self.clock()
        token = session.access_token
        keys, limits, rows, audit = await asyncio.gather(
            self.keys.list_keys(token, client, workspace),
            self.keys.workspace(token, client, workspace),
            self.keys.usage(token, client, workspace, since=now - timedelta(hours=24), until=now),
            self.keys.audit(token, client, workspace),
        )
        used = per_key(rows)
        creators = {e["key_id"]: e["actor_subject"] for e in audit if e["action"] == "key.create"}
        for key in keys:
            key["requests_24h"] = used.get(key["id"], {}).get("requests", 0)
            key["created_by"] = creators.get(key["id"], "")
        return web.json_response({"workspace": limits, "keys": keys})

    async def create_key(self, request: web.Request) -> web.StreamResponse:
        session = self._member(request, changes_state=True)
        body = await _body(request)
        label = body.get("label")
        if not isinstance(label, str) or not label.strip():
            return _problem(400, "invalid", "enter a Label that names the workload")
        created = await self.keys.create_key(
            session.access_token, _client(request), request.match_info["workspace"], label.strip()
        )
        return web.json_response(created, status=201)

    async def revoke_key(self, request: web.Request) -> web.StreamResponse:
        session = self._member(request, changes_state=True)
        body = await _body(request)
        revoked = await self.keys.revoke_key(
            session.access_token,
            _client(request),
            request.match_info["workspace"],
            request.match_info["key"],
            leaked=body.get("leaked") is True,
        )
        return web.json_response(revoked)

    async def rotate_key(self, request: web.Request) -> web.StreamResponse:
        session = self._member(request, changes_state=True)
        grace = (await _body(request)).get("grace_hours")
        if grace is not None and (isinstance(grace, bool) or not isinstance(grace, int | float)):
            return _problem(400, "invalid", "the grace period is a number of hours")
        rotated = await self.keys.rotate_key(
            session.access_token,
            _client(request),
            request.match_info["workspace"],
            request.match_info["key"],
            grace_s=None if grace is None else round(grace * 3600),
        )
        return web.json_response(rotated, status=201)

    async def usage(self, request: web.Request) -> web.StreamResponse:
        session, workspace = self._member(request), request.match_info["workspace"]
        name = request.query.get("range", "24h")
        if name not in (*RANGES, "month"):
            return _problem(400, "invalid", "range is 24h, 7d or month")
        now = self.clock()
        month_start, _ = period_bounds(period_of(now))
        span = window(name, now, month_start)
        token, client = session.access_token, _client(request)
        rows, month, limits, keys, audit, observations = await asyncio.gather(
            self.keys.usage(token, client, workspace, since=span.since, until=span.until),
            self.keys.usage(token, client, workspace, since=month_start, until=span.until),
            self.keys.workspace(token, client, workspace),
            self.keys.list_keys(token, client, workspace),
            self.keys.audit(token, client, workspace),
            self.keys.observations(token, client, workspace, since=span.since, until=span.until),
        )
        points, totals = hourly(rows, span), per_key(rows)
        return web.json_response(
            {
                "range": name,
                "since": span.since.isoformat(),
                "until": span.until.isoformat(),
                "hours": points,
                "per_key": totals,
                **observed(points, totals, observations),
                "keys": {k["id"]: {"label": k["label"], "mask": k["mask"]} for k in keys},
                "month": month_totals(month),
                "workspace": limits,
                "audit": audit,
            }
        )

    # Guards

    def _member(self, request: web.Request, *, changes_state: bool = False) -> Session:
        found = self.sessions.get(request.cookies.get(self.cookie))
        if not isinstance(found, Session):
            expired = found == Lookup.EXPIRED
            message = "your session expired: sign in again" if expired else "sign in first"
            raise web.HTTPUnauthorized(
                text=json.dumps({"error": found, "message": message}),
                content_type="application/json",
            )
        if changes_state:
            sent = request.headers.get(CSRF_HEADER, "")
            origin = request.headers.get("Origin", self.settings.public_origin)
            if not hmac.compare_digest(sent, found.csrf_token) or (
                origin != self.settings.public_origin
            ):
                raise web.HTTPForbidden(
                    text='{"error": "csrf", "message": "reload the page and try again"}',
                    content_type="application/json",
                )
        return found


def _to_signin(reason: str) -> web.HTTPFound:
    return web.HTTPFound("/console/signin?" + urlencode({"error": reason}))


def _client(request: web.Request) -> str:
    """The address Envoy saw (last X-Forwarded-For hop), for the key API's audit log."""
    hop = request.headers.get("X-Forwarded-For", "").split(",")[-1].strip()
    return hop or (request.remote or "")


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(
            text='{"error": "invalid", "message": "expected a JSON object"}',
            content_type="application/json",
        )
    return body


def key_api_errors(console: Console) -> Callable[..., Awaitable[web.StreamResponse]]:
    """The key API's refusals as the page's JSON; a 401 from it ends the session."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except KeyApiError as error:
            if error.status == 401:
                console.sessions.end(request.cookies.get(console.cookie))
                return _problem(401, Lookup.EXPIRED, "your session expired: sign in again")
            kind = {403: "forbidden", 409: "refused", 404: "not_found", 400: "invalid"}
            return _problem(error.status, kind.get(error.status, "unavailable"), str(error))

    return middleware


async def _shell(_request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def _to_console(_request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/console/")


def build_app(console: Console) -> web.Application:
    app = web.Application(middlewares=[security_headers, key_api_errors(console)])
    app.router.add_get("/console", _to_console)
    for path in ("/console/", "/console/signin", "/console/w/{workspace}/{page}"):
        app.router.add_get(path, _shell)
    app.router.add_static("/console/static/", STATIC)
    app.router.add_get("/console/auth/login", console.login)
    app.router.add_get("/console/auth/callback", console.callback)
    app.router.add_post("/console/auth/logout", console.logout)
    app.router.add_get("/console/api/providers", console.providers)
    app.router.add_get("/console/api/session", console.session)
    app.router.add_get("/console/api/w/{workspace}/keys", console.list_keys)
    app.router.add_post("/console/api/w/{workspace}/keys", console.create_key)
    app.router.add_post("/console/api/w/{workspace}/keys/{key}/revoke", console.revoke_key)
    app.router.add_post("/console/api/w/{workspace}/keys/{key}/rotate", console.rotate_key)
    app.router.add_get("/console/api/w/{workspace}/usage", console.usage)
    return app
