"""One identity provider's JWKS, kept in step with the provider.

The whole key set is cached and replaced on every refresh, so a key the provider removed stops
verifying within one refresh interval (PyJWKClient's per-`kid` cache never forgets a key). A
token naming an unknown `kid` forces one early refetch (the provider may have rotated), but at
most once per cooldown, so tokens with made-up `kid`s cannot make us hammer the provider. Time
comes from an injected monotonic clock. Fetching is blocking (urllib, under a timeout, through
PyJWT, which refuses redirects): callers run it on a worker thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import jwt

JWKS_REFRESH_S = 300.0
"""How long a fetched JWKS is trusted; a removed key stops verifying at most this much later."""
JWKS_COOLDOWN_S = 30.0
"""Least time between fetches forced by unknown `kid`s."""


class JwksUnavailable(Exception):
    """The provider's JWKS could not be fetched or is not a usable key set."""


class UnknownSigningKey(Exception):
    """The provider does not (or no longer) publish the token's `kid`."""


class JwksKeys:
    """The signing keys one JWKS URL publishes, by `kid`; thread-safe."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float,
        refresh_s: float = JWKS_REFRESH_S,
        cooldown_s: float = JWKS_COOLDOWN_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # PyJWT's own set cache is off: this class decides when to fetch, on `clock`.
        self._client = jwt.PyJWKClient(url, cache_jwk_set=False, timeout=timeout_s)
        self._refresh_s = refresh_s
        self._cooldown_s = cooldown_s
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None

    def signing_key(self, kid: str | None) -> jwt.PyJWK:
        """The published key `kid`; raises UnknownSigningKey or JwksUnavailable."""
        with self._lock:
            now = self._clock()
            if self._fetched_at is None or now - self._fetched_at >= self._refresh_s:
                self._fetch(now)
            key = self._keys.get(kid or "")
            cooled = self._fetched_at is not None and now - self._fetched_at >= self._cooldown_s
            if key is None and kid and cooled:
                self._fetch(now)
                key = self._keys.get(kid)
            if key is None:
                raise UnknownSigningKey(kid)
            return key

    def _fetch(self, now: float) -> None:
        try:
            published = self._client.get_jwk_set()
        except (jwt.PyJWKClientError, jwt.PyJWKSetError, OSError, ValueError) as error:
            # Expired keys are dropped even when the refresh fails: never trust a stale set.
            self._keys, self._fetched_at = {}, None
            raise JwksUnavailable(str(error)) from None
        self._keys = {
            key.key_id: key
            for key in published.keys
            if key.key_id and key.public_key_use in ("sig", None)
        }
        self._fetched_at = now
