"""A test identity provider on loopback: keys generated here, JWKS served over real HTTP.

It signs tokens with an RSA (RS256) or EC P-256 (ES256) key, publishes the public halves as a
JWKS document on a free port, counts fetches (to see PyJWKClient's cache at work) and can be
told to hang, to test the sidecar's timeout.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

AUDIENCE = "oais-keys"
WORKSPACE_CLAIM = "workspaces"
PERMISSION_CLAIM = "permissions"
MANAGE = "keys:manage"

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def new_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def new_ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_jwk(key: PrivateKey, kid: str) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        data = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
        data["alg"] = "RS256"
    else:
        data = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
        data["alg"] = "ES256"
    data["kid"] = kid
    data["use"] = "sig"
    return dict(data)


@dataclass
class TestIdp:
    """Signs tokens; `url` serves the JWKS while `serve()` runs."""

    __test__ = False  # not a pytest test class

    rsa_key: rsa.RSAPrivateKey = field(default_factory=new_rsa_key)
    ec_key: ec.EllipticCurvePrivateKey = field(default_factory=new_ec_key)
    issuer: str = "https://idp.test.example"
    audience: str = AUDIENCE
    fetches: int = 0
    hang: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)
    port: int = 0
    published: dict[str, PrivateKey] | None = None
    """What the JWKS serves, by kid; None: the RSA key as `rsa-1` and the EC key as `ec-1`.
    Tests change it to remove or rotate keys while the server runs."""

    @property
    def jwks_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/.well-known/jwks.json"

    def jwks(self) -> dict[str, Any]:
        published = self.published
        if published is None:
            published = {"rsa-1": self.rsa_key, "ec-1": self.ec_key}
        return {"keys": [public_jwk(key, kid) for kid, key in published.items()]}

    def config(self, **overrides: Any) -> dict[str, Any]:
        """This provider's entry for AUTHZ_JWT_ISSUERS."""
        entry: dict[str, Any] = {
            "issuer": self.issuer,
            "jwks_url": self.jwks_url,
            "audience": self.audience,
            "workspace_claim": WORKSPACE_CLAIM,
            "permission_claim": PERMISSION_CLAIM,
            "manage_permission": MANAGE,
            # One issuer in most tests: a single-tenant deployment. Tests of several issuers
            # bind each to its workspaces.
            "workspaces": "*",
        }
        entry.update(overrides)
        return entry

    def token(
        self,
        *,
        subject: str = "alice@example.com",
        workspaces: Iterable[str] = (),
        permissions: Iterable[str] = (MANAGE,),
        alg: str = "RS256",
        expires_in: float = 300,
        audience: str | None = None,
        issuer: str | None = None,
        key: PrivateKey | None = None,
        kid: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": issuer or self.issuer,
            "sub": subject,
            "aud": audience or self.audience,
            "iat": now,
            "exp": now + int(expires_in),
            WORKSPACE_CLAIM: list(workspaces),
            PERMISSION_CLAIM: list(permissions),
            **(extra or {}),
        }
        signer = key or (self.rsa_key if alg == "RS256" else self.ec_key)
        default_kid = "rsa-1" if alg == "RS256" else "ec-1"
        return jwt.encode(claims, signer, algorithm=alg, headers={"kid": kid or default_kid})

    @contextmanager
    def serve(self) -> Iterator[TestIdp]:
        """Serve the JWKS on 127.0.0.1 (a free port) until the block ends."""
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                idp.fetches += 1
                if idp.hang.is_set():
                    # Hold the connection open without answering, until the test ends.
                    idp.released.wait(timeout=30)
                    return
                body = json.dumps(idp.jwks()).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.released = threading.Event()
        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.02},
            name="test-idp",
            daemon=True,
        )
        thread.start()
        try:
            yield self
        finally:
            self.released.set()
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)


def issuers_json(*entries: dict[str, Any]) -> str:
    return json.dumps(list(entries))


def jwks_issuer(issuer: str, *, workspaces: list[str]) -> dict[str, Any]:
    """An AUTHZ_JWT_ISSUERS entry for `issuer`, its keys at `<issuer>/jwks`, with this suite's
    claim names, bound to `workspaces`."""
    return {
        "issuer": issuer,
        "audience": AUDIENCE,
        "workspaces": workspaces,
        "workspace_claim": WORKSPACE_CLAIM,
        "permission_claim": PERMISSION_CLAIM,
        "manage_permission": MANAGE,
        "jwks_url": f"{issuer}/jwks",
    }
