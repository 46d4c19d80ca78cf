"""Console sessions: PKCE, expiry with the token, one-time sign-in state."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from authz.console.sessions import Lookup, Session, SessionStore, code_challenge
from authz.identity import Identity

T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
MEMBER = Identity(
    subject="ana", issuer="https://idp", workspaces=frozenset({"ws"}), may_manage_keys=True
)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def test_pkce_challenge_matches_rfc_7636_appendix_b() -> None:
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert code_challenge(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_a_session_ends_with_its_token_and_then_says_it_expired() -> None:
    clock = Clock()
    store = SessionStore(clock=clock, max_age=timedelta(hours=8))
    session = store.create(
        access_token="t", identity=MEMBER, token_expires_at=T0 + timedelta(minutes=5)
    )
    assert store.get(session.id) == session
    clock.now = T0 + timedelta(minutes=5)
    assert store.get(session.id) == Lookup.EXPIRED
    assert store.get(session.id) == Lookup.SIGNED_OUT


def test_the_maximum_age_caps_a_long_lived_token() -> None:
    store = SessionStore(clock=Clock(), max_age=timedelta(hours=1))
    session = store.create(
        access_token="t", identity=MEMBER, token_expires_at=T0 + timedelta(days=2)
    )
    assert session.expires_at == T0 + timedelta(hours=1)


def test_sign_out_ends_the_session_and_ids_are_unguessable() -> None:
    store = SessionStore(clock=Clock(), max_age=timedelta(hours=1))
    one = store.create(access_token="t", identity=MEMBER, token_expires_at=T0 + timedelta(hours=1))
    two = store.create(access_token="t", identity=MEMBER, token_expires_at=T0 + timedelta(hours=1))
    assert len(one.id) >= 43
    assert one.id != two.id
    assert one.csrf_token != two.csrf_token
    store.end(one.id)
    assert store.get(one.id) == Lookup.SIGNED_OUT
    assert isinstance(store.get(two.id), Session)
    assert store.get(None) == Lookup.SIGNED_OUT


def test_a_sign_in_state_is_used_once_and_only_for_ten_minutes() -> None:
    clock = Clock()
    store = SessionStore(clock=clock, max_age=timedelta(hours=1))
    state, verifier = store.start_login("https://idp")
    pending = store.finish_login(state)
    assert pending is not None
    assert pending.code_verifier == verifier
    assert pending.issuer == "https://idp"
    assert store.finish_login(state) is None
    late, _ = store.start_login("https://idp")
    clock.now = T0 + timedelta(minutes=11)
    assert store.finish_login(late) is None
