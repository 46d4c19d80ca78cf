"""Sign-in for key management: who is calling, verified from `Authorization: Bearer <JWT>`.

Operators list the identity providers they trust in AUTHZ_JWT_ISSUERS (a JSON file, or the
JSON inline). Each issuer has a JWKS URL or static public keys, an audience, and the claims
that carry the caller's workspaces and the permission to manage keys. Only RS256 and ES256
are accepted: asymmetric, so the sidecar never holds a secret that could mint tokens.

Each issuer is bound to the workspaces it may grant (`workspaces`: a list of ids, or `"*"` in a
single-tenant deployment with one issuer): a token's workspace claim counts only where its
issuer is bound, so one tenant's IdP admin cannot mint access to another tenant. The token's
unverified `iss` only picks which issuer's keys to try; the signature is then verified with
those keys and `iss` checked exactly, so an identity always comes from the issuer that signed.

JWKS documents are fetched and cached by authz/jwks.py (a removed key stops verifying within
one refresh), on a worker thread and under a timeout, so a slow provider never blocks the event
loop. Tokens are never logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from authz.jwks import JwksKeys, JwksUnavailable, UnknownSigningKey
from authz.keys import KEY_PREFIX

log = logging.getLogger(__name__)

SUPPORTED_ALGORITHMS = ("RS256", "ES256")
DEFAULT_LEEWAY_S = 30.0


class IssuerConfigError(ValueError):
    """AUTHZ_JWT_ISSUERS is malformed; the message says which issuer and field."""


class Unauthenticated(Exception):
    """No acceptable sign-in: gRPC UNAUTHENTICATED, 401 through Envoy."""


class Forbidden(Exception):
    """Signed in, but not allowed to manage keys here: gRPC PERMISSION_DENIED, 403."""


class SignInUnavailable(Exception):
    """The provider's keys could not be fetched: gRPC UNAVAILABLE (never a false 401)."""


@dataclass(frozen=True, slots=True)
class IssuerConfig:
    """One trusted identity provider, as configured."""

    issuer: str
    audience: str
    workspace_claim: str
    permission_claim: str
    manage_permission: str
    jwks_url: str | None = None
    keys: tuple[jwt.PyJWK, ...] = ()
    algorithms: tuple[str, ...] = SUPPORTED_ALGORITHMS
    leeway_s: float = DEFAULT_LEEWAY_S
    workspaces: frozenset[str] = frozenset()
    """The workspaces this issuer may grant; empty when `all_workspaces` (single tenant)."""
    all_workspaces: bool = False

    def grantable(self, claimed: frozenset[str]) -> frozenset[str]:
        """The claimed workspaces this issuer is bound to; the rest do not count."""
        return claimed if self.all_workspaces else claimed & self.workspaces


@dataclass(frozen=True, slots=True)
class Identity:
    """A verified caller: the token's subject and issuer, and what its claims grant."""

    subject: str
    issuer: str
    workspaces: frozenset[str]
    may_manage_keys: bool

    def require_manager(self, workspace_id: str) -> None:
        """Raise Forbidden unless this identity may manage keys in `workspace_id`."""
        if not self.may_manage_keys:
            raise Forbidden("your sign-in does not carry the permission to manage keys")
        if workspace_id not in self.workspaces:
            raise Forbidden(f"your sign-in gives you no access to workspace {workspace_id}")


# Configuration


_REQUIRED = ("issuer", "audience", "workspace_claim", "permission_claim", "manage_permission")
_KNOWN = {*_REQUIRED, "workspaces", "jwks_url", "keys", "algorithms", "leeway_s"}
ANY_WORKSPACE = "*"
"""`"workspaces": "*"`: the one issuer of a single-tenant deployment may grant any workspace."""


def load_issuers(raw: str) -> tuple[IssuerConfig, ...]:
    """Issuers from inline JSON (a list, or `{"issuers": [...]}`) or the path of a JSON file."""
    text = raw.strip()
    if not text:
        return ()
    if not text.startswith(("[", "{")):
        try:
            text = Path(text).read_text(encoding="utf-8")
        except OSError as error:
            raise IssuerConfigError(f"cannot read {raw.strip()}: {error.strerror}") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise IssuerConfigError(f"not valid JSON: {error}") from None
    if isinstance(document, dict) and set(document) == {"issuers"}:
        document = document["issuers"]
    if not isinstance(document, list):
        raise IssuerConfigError('expected a JSON list of issuers, or {"issuers": [...]}')
    issuers = tuple(_issuer(entry, index) for index, entry in enumerate(document))
    names = [i.issuer for i in issuers]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise IssuerConfigError(f"issuer {duplicates[0]!r} is listed twice")
    wildcard = [i.issuer for i in issuers if i.all_workspaces]
    if wildcard and len(issuers) > 1:
        raise IssuerConfigError(
            f'issuer {wildcard[0]!r}: "workspaces": "*" is only for a single issuer; '
            "with several, list each issuer's workspace ids"
        )
    return issuers


def _issuer(entry: Any, index: int) -> IssuerConfig:
    where = f"issuer #{index + 1}"
    if not isinstance(entry, dict):
        raise IssuerConfigError(f"{where} is not a JSON object")
    if isinstance(entry.get("issuer"), str):
        where = f"issuer {entry['issuer']!r}"
    unknown = sorted(set(entry) - _KNOWN)
    if unknown:
        raise IssuerConfigError(f"{where}: unknown field {unknown[0]!r}")
    for name in _REQUIRED:
        value = entry.get(name)
        if not isinstance(value, str) or not value.strip():
            raise IssuerConfigError(f"{where}: {name!r} must be a non-empty string")
    jwks_url = entry.get("jwks_url")
    raw_keys = entry.get("keys")
    if (jwks_url is None) == (raw_keys is None):
        raise IssuerConfigError(f"{where}: give exactly one of 'jwks_url' or 'keys'")
    if jwks_url is not None and (
        not isinstance(jwks_url, str) or not jwks_url.startswith(("https://", "http://"))
    ):
        raise IssuerConfigError(f"{where}: 'jwks_url' must be an http(s) URL")
    algorithms = entry.get("algorithms", list(SUPPORTED_ALGORITHMS))
    if (
        not isinstance(algorithms, list)
        or not algorithms
        or any(a not in SUPPORTED_ALGORITHMS for a in algorithms)
    ):
        raise IssuerConfigError(f"{where}: 'algorithms' must be a non-empty subset of RS256, ES256")
    leeway = entry.get("leeway_s", DEFAULT_LEEWAY_S)
    if isinstance(leeway, bool) or not isinstance(leeway, int | float) or not 0 <= leeway <= 300:
        raise IssuerConfigError(f"{where}: 'leeway_s' must be a number of seconds from 0 to 300")
    bound = _bound_workspaces(entry.get("workspaces"), where)
    return IssuerConfig(
        issuer=entry["issuer"],
        audience=entry["audience"],
        workspace_claim=entry["workspace_claim"],
        permission_claim=entry["permission_claim"],
        manage_permission=entry["manage_permission"],
        jwks_url=jwks_url,
        keys=() if raw_keys is None else _static_keys(raw_keys, where),
        algorithms=tuple(algorithms),
        leeway_s=float(leeway),
        workspaces=frozenset() if bound is None else bound,
        all_workspaces=bound is None,
    )


def _bound_workspaces(raw: Any, where: str) -> frozenset[str] | None:
    """The ids an issuer may grant, or None for `"*"` (any workspace)."""
    if raw == ANY_WORKSPACE:
        return None
    if (
        not isinstance(raw, list)
        or not raw
        or any(not isinstance(w, str) or not w.strip() or w == ANY_WORKSPACE for w in raw)
    ):
        raise IssuerConfigError(
            f"{where}: 'workspaces' must be a non-empty list of the workspace ids this issuer "
            'may grant (or "*" when it is the only issuer)'
        )
    return frozenset(raw)


def _static_keys(raw: Any, where: str) -> tuple[jwt.PyJWK, ...]:
    """Public keys given inline: JWK objects (a JWKS's `keys`) or PEM strings."""
    if isinstance(raw, dict) and isinstance(raw.get("keys"), list):
        raw = raw["keys"]
    if not isinstance(raw, list) or not raw:
        raise IssuerConfigError(f"{where}: 'keys' must be a non-empty list of JWKs or PEM keys")
    keys = []
    for number, item in enumerate(raw, start=1):
        try:
            key = _pem_key(item) if isinstance(item, str) else jwt.PyJWK(item)
        except (jwt.PyJWTError, ValueError, TypeError) as error:
            raise IssuerConfigError(f"{where}: key #{number} is unusable: {error}") from None
        if key.algorithm_name not in SUPPORTED_ALGORITHMS:
            raise IssuerConfigError(
                f"{where}: key #{number} is for {key.algorithm_name}; only RS256 and ES256 keys"
            )
        if not isinstance(key.key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            raise IssuerConfigError(f"{where}: key #{number} must be a public key")
        keys.append(key)
    return tuple(keys)


def _pem_key(pem: str) -> jwt.PyJWK:
    public = load_pem_public_key(pem.encode("ascii"))
    if isinstance(public, rsa.RSAPublicKey):
        return jwt.PyJWK(json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(public)), "RS256")
    if isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1":
        return jwt.PyJWK(json.loads(jwt.algorithms.ECAlgorithm.to_jwk(public)), "ES256")
    raise ValueError("only RSA and P-256 EC public keys are supported")


# Verification


def _shown(value: object) -> str:
    """An untrusted claim, fit for an error message: printable and short."""
    text = "".join(ch for ch in str(value) if ch.isprintable())
    return text if len(text) <= 100 else text[:97] + "..."


def _as_set(value: Any, *, split: bool) -> frozenset[str]:
    if isinstance(value, str):
        return frozenset(value.split()) if split else frozenset({value})
    if isinstance(value, list):
        return frozenset(v for v in value if isinstance(v, str))
    return frozenset()


def bearer_token(authorization: str | None) -> str:
    """The token in an `Authorization: Bearer ...` value; refuses API keys outright."""
    if not authorization:
        raise Unauthenticated("sign in first: send Authorization: Bearer <JWT>")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("sign in first: send Authorization: Bearer <JWT>")
    if token.startswith(KEY_PREFIX):
        raise Unauthenticated(
            "an API key cannot manage keys: sign in with your identity provider "
            "and send its JWT as the bearer token"
        )
    return token


class IdentityVerifier:
    """Verifies sign-in tokens against the configured issuers; one per process."""

    def __init__(
        self,
        issuers: Sequence[IssuerConfig],
        *,
        jwks_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._issuers = {i.issuer: i for i in issuers}
        self._timeout = jwks_timeout_s
        self._jwks = {
            i.issuer: JwksKeys(i.jwks_url, timeout_s=jwks_timeout_s, clock=clock)
            for i in issuers
            if i.jwks_url is not None
        }

    async def verify(self, authorization: str | None) -> Identity:
        """The caller behind this Authorization header, or Unauthenticated / SignInUnavailable."""
        token = bearer_token(authorization)
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("the sign-in token is not a well-formed JWT") from None
        issuer = self._issuers.get(str(unverified.get("iss", "")))
        if issuer is None:
            raise Unauthenticated(
                f"unsupported sign-in provider {_shown(unverified.get('iss', ''))!r}: "
                "sign in with a provider this deployment trusts"
            )
        if header.get("alg") not in issuer.algorithms:
            raise Unauthenticated(
                f"sign-in token algorithm {_shown(header.get('alg'))!r} is not accepted"
            )
        claims = self._decode(token, issuer, await self._candidate_keys(token, header, issuer))
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise Unauthenticated("the sign-in token names no subject")
        return Identity(
            subject=subject,
            issuer=issuer.issuer,
            workspaces=issuer.grantable(_as_set(claims.get(issuer.workspace_claim), split=False)),
            may_manage_keys=issuer.manage_permission
            in _as_set(claims.get(issuer.permission_claim), split=True),
        )

    async def _candidate_keys(
        self, token: str, header: Mapping[str, Any], issuer: IssuerConfig
    ) -> list[jwt.PyJWK]:
        client = self._jwks.get(issuer.issuer)
        if client is None:
            kid = header.get("kid")
            # A key configured without a kid (e.g. a PEM key) may have signed any token.
            found = [k for k in issuer.keys if kid is None or k.key_id in (None, kid)]
            if not found:
                raise Unauthenticated("the sign-in token was signed by an unknown key")
            return found
        kid = header.get("kid")
        try:
            async with asyncio.timeout(self._timeout):
                key = await asyncio.to_thread(
                    client.signing_key, kid if isinstance(kid, str) else None
                )
        except TimeoutError:
            log.warning("sign-in: JWKS of %s timed out", issuer.issuer)
            raise SignInUnavailable("the sign-in provider's keys could not be fetched") from None
        except JwksUnavailable as error:
            # Unreachable, or answering with something that is not a JWKS: not the caller's
            # fault, so never a 401.
            log.warning("sign-in: cannot use the JWKS of %s: %s", issuer.issuer, error)
            raise SignInUnavailable("the sign-in provider's keys could not be fetched") from None
        except UnknownSigningKey:
            raise Unauthenticated("the sign-in token was signed by an unknown key") from None
        return [key]

    def _decode(
        self, token: str, issuer: IssuerConfig, keys: Iterable[jwt.PyJWK]
    ) -> dict[str, Any]:
        failure: jwt.PyJWTError | None = None
        for key in keys:
            try:
                return jwt.decode(
                    token,
                    key=key,
                    algorithms=list(issuer.algorithms),
                    audience=issuer.audience,
                    issuer=issuer.issuer,
                    leeway=issuer.leeway_s,
                    options={"require": ["exp", "iss", "aud", "sub"]},
                )
            except (jwt.InvalidSignatureError, jwt.InvalidAlgorithmError) as error:
                failure = error  # maybe another of the issuer's keys signed it
            except jwt.PyJWTError as error:
                raise Unauthenticated(_reason(error)) from None
        raise Unauthenticated(_reason(failure)) from None


def _reason(error: jwt.PyJWTError | None) -> str:
    """One line per failure, naming what to fix without echoing the token."""
    if isinstance(error, jwt.ExpiredSignatureError):
        return "the sign-in token has expired: sign in again"
    if isinstance(error, jwt.InvalidAudienceError):
        return "the sign-in token is for another audience"
    if isinstance(error, jwt.ImmatureSignatureError):
        return "the sign-in token is not valid yet"
    if isinstance(error, jwt.MissingRequiredClaimError):
        return f"the sign-in token lacks the {error.claim!r} claim"
    if isinstance(error, jwt.InvalidIssuerError):
        return "the sign-in token's issuer does not match"
    if isinstance(error, jwt.InvalidAlgorithmError):
        return "the sign-in token's algorithm does not match its key"
    if isinstance(error, jwt.InvalidSignatureError):
        return "the sign-in token's signature is invalid"
    return "the sign-in token is invalid"
