"""Server-side console sessions: the browser holds only a random id in an HttpOnly cookie.

Pure bookkeeping with an injected clock; nothing here touches the network. Sessions live in
this process's memory (no separate database): a restart signs everyone out, which is safe.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from authz.identity import Identity

PENDING_LOGIN_TTL = timedelta(minutes=10)
"""How long a started sign-in may take at the provider before its state is forgotten."""


@dataclass(frozen=True, slots=True)
class PendingLogin:
    """A sign-in sent to a provider: checked when the provider sends the browser back."""

    issuer: str
    code_verifier: str
    started_at: datetime


@dataclass(frozen=True, slots=True)
class Session:
    """A signed-in member: the JWT forwarded to the key API and what it grants."""

    id: str
    csrf_token: str
    access_token: str
    identity: Identity
    expires_at: datetime


def code_challenge(verifier: str) -> str:
    """PKCE S256: base64url(SHA-256(verifier)) without padding (RFC 7636 §4.2)."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class Lookup:
    """Why `SessionStore.get` found no usable session."""

    SIGNED_OUT = "signed_out"
    EXPIRED = "session_expired"


class SessionStore:
    """Sessions and pending sign-ins by their random ids; one per console process."""

    def __init__(self, *, clock: Callable[[], datetime], max_age: timedelta) -> None:
        self._clock = clock
        self._max_age = max_age
        self._sessions: dict[str, Session] = {}
        self._pending: dict[str, PendingLogin] = {}

    def start_login(self, issuer: str) -> tuple[str, str]:
        """(state, code_verifier) for a new sign-in with `issuer`."""
        self._forget_old_logins()
        state = secrets.token_urlsafe(32)
        verifier = secrets.token_urlsafe(64)
        self._pending[state] = PendingLogin(issuer, verifier, self._clock())
        return state, verifier

    def finish_login(self, state: str) -> PendingLogin | None:
        """The sign-in this state belongs to, once; None if unknown or too old."""
        self._forget_old_logins()
        return self._pending.pop(state, None)

    def create(
        self, *, access_token: str, identity: Identity, token_expires_at: datetime
    ) -> Session:
        """A new session, ending when its token does or after the configured maximum age."""
        session = Session(
            id=secrets.token_urlsafe(32),
            csrf_token=secrets.token_urlsafe(32),
            access_token=access_token,
            identity=identity,
            expires_at=min(token_expires_at, self._clock() + self._max_age),
        )
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session | str:
        """The live session, or why there is none (Lookup.SIGNED_OUT or Lookup.EXPIRED)."""
        session = self._sessions.get(session_id) if session_id else None
        if session is None:
            return Lookup.SIGNED_OUT
        if session.expires_at <= self._clock():
            del self._sessions[session.id]
            return Lookup.EXPIRED
        return session

    def end(self, session_id: str | None) -> None:
        if session_id:
            self._sessions.pop(session_id, None)

    def _forget_old_logins(self) -> None:
        oldest = self._clock() - PENDING_LOGIN_TTL
        for state in [s for s, p in self._pending.items() if p.started_at < oldest]:
            del self._pending[state]
        # An expired session answers "expired" for a while (the page says so), then goes.
        for sid in [s for s, v in self._sessions.items() if v.expires_at < oldest]:
            del self._sessions[sid]
