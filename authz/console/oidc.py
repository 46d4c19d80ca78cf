"""OpenID Connect authorization-code flow with PKCE, client side (RFC 6749, 7636; OIDC Core).

The provider's endpoints come from its discovery document, fetched once per issuer and kept.
The token response's access token is the JWT the key API verifies; it never reaches the
browser.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import aiohttp

from authz.console.sessions import code_challenge
from authz.console.settings import OidcClient


class ProviderError(Exception):
    """The identity provider could not be reached or answered something unusable."""


@dataclass(frozen=True, slots=True)
class Endpoints:
    authorization: str
    token: str


class OidcFlow:
    """Builds authorization URLs and redeems codes for the configured clients."""

    def __init__(
        self,
        *,
        http: aiohttp.ClientSession,
        clients: Mapping[str, OidcClient],
        redirect_uri: str,
        timeout_s: float,
    ) -> None:
        self._http = http
        self._clients = clients
        self._redirect_uri = redirect_uri
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._endpoints: dict[str, Endpoints] = {}
        self._lock = asyncio.Lock()

    async def authorization_url(self, issuer: str, *, state: str, code_verifier: str) -> str:
        client = self._clients[issuer]
        endpoints = await self._discover(issuer)
        query = {
            "response_type": "code",
            "client_id": client.client_id,
            "redirect_uri": self._redirect_uri,
            "scope": client.scope,
            "state": state,
            "code_challenge": code_challenge(code_verifier),
            "code_challenge_method": "S256",
        }
        return f"{endpoints.authorization}?{urlencode(query)}"

    async def redeem(self, issuer: str, *, code: str, code_verifier: str) -> str:
        """The access token for an authorization code."""
        client = self._clients[issuer]
        endpoints = await self._discover(issuer)
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self._redirect_uri,
            "code_verifier": code_verifier,
        }
        auth = None
        if client.client_secret is None:
            form["client_id"] = client.client_id
        else:
            auth = aiohttp.BasicAuth(client.client_id, client.client_secret)
        answer = await self._json("POST", endpoints.token, data=form, auth=auth)
        token = answer.get("access_token")
        if not isinstance(token, str) or not token:
            raise ProviderError("the provider's token response has no access_token")
        return token

    async def _discover(self, issuer: str) -> Endpoints:
        async with self._lock:
            found = self._endpoints.get(issuer)
            if found is None:
                url = issuer.rstrip("/") + "/.well-known/openid-configuration"
                document = await self._json("GET", url)
                authorization = document.get("authorization_endpoint")
                token = document.get("token_endpoint")
                if not isinstance(authorization, str) or not isinstance(token, str):
                    raise ProviderError(f"{issuer}'s discovery document lacks its endpoints")
                found = self._endpoints[issuer] = Endpoints(authorization, token)
            return found

    async def _json(self, method: str, url: str, **kwargs: Any) -> dict[str, Any]:
        try:
            async with self._http.request(method, url, timeout=self._timeout, **kwargs) as reply:
                body = await reply.json(content_type=None)
                if reply.status != 200 or not isinstance(body, dict):
                    error = (
                        body.get("error", reply.status) if isinstance(body, dict) else reply.status
                    )
                    raise ProviderError(f"the provider answered {error} at {url}")
                return body
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            raise ProviderError(f"the provider could not be reached at {url}: {error!r}") from None
