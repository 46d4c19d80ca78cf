"""The JWKS follows the identity provider: removed keys stop verifying within one refresh
interval, rotated-in keys are picked up, and unknown kids cannot make us hammer the provider.
A real JWKS server on loopback; time from an injected clock."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest

from authz.identity import IdentityVerifier, Unauthenticated, load_issuers
from authz.jwks import JWKS_COOLDOWN_S, JWKS_REFRESH_S
from tests.support.idp import TestIdp, new_rsa_key

WS = "ws_alpha"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def idp() -> Iterator[TestIdp]:
    with TestIdp().serve() as serving:
        yield serving


@pytest.fixture
def clock() -> Clock:
    return Clock()


def verifier(idp: TestIdp, clock: Clock) -> IdentityVerifier:
    issuers = load_issuers(json.dumps([idp.config()]))
    return IdentityVerifier(issuers, jwks_timeout_s=2, clock=clock)


async def test_a_removed_key_stops_verifying_within_one_refresh(idp: TestIdp, clock: Clock) -> None:
    sign_in = verifier(idp, clock)
    token = idp.token(workspaces=[WS], kid="rsa-1")
    await sign_in.verify(f"Bearer {token}")
    # The provider drops rsa-1 (say it leaked): only the EC key is published now.
    idp.published = {"ec-1": idp.ec_key}
    clock.now += JWKS_REFRESH_S - 1
    await sign_in.verify(f"Bearer {token}")  # still inside the interval it was fetched for
    assert idp.fetches == 1
    clock.now += 1
    with pytest.raises(Unauthenticated, match="signed by an unknown key"):
        await sign_in.verify(f"Bearer {token}")
    assert idp.fetches == 2
    # The remaining key still works, from the refreshed set.
    await sign_in.verify(f"Bearer {idp.token(workspaces=[WS], alg='ES256')}")
    assert idp.fetches == 2


async def test_a_rotated_in_key_is_fetched_on_first_use_after_the_cooldown(
    idp: TestIdp, clock: Clock
) -> None:
    sign_in = verifier(idp, clock)
    await sign_in.verify(f"Bearer {idp.token(workspaces=[WS])}")
    successor = new_rsa_key()
    idp.published = {"rsa-1": idp.rsa_key, "rsa-2": successor}
    rotated = idp.token(workspaces=[WS], key=successor, kid="rsa-2")
    clock.now += JWKS_COOLDOWN_S
    identity = await sign_in.verify(f"Bearer {rotated}")
    assert identity.workspaces == {WS}
    assert idp.fetches == 2
    # Then the old key is retired: gone at the next refresh, while the new one keeps working.
    idp.published = {"rsa-2": successor}
    clock.now += JWKS_REFRESH_S
    with pytest.raises(Unauthenticated, match="unknown key"):
        await sign_in.verify(f"Bearer {idp.token(workspaces=[WS], kid='rsa-1')}")
    await sign_in.verify(f"Bearer {rotated}")


async def test_unknown_kids_refetch_at_most_once_per_cooldown(idp: TestIdp, clock: Clock) -> None:
    sign_in = verifier(idp, clock)
    await sign_in.verify(f"Bearer {idp.token(workspaces=[WS])}")
    clock.now += JWKS_COOLDOWN_S
    for _ in range(50):
        made_up = idp.token(workspaces=[WS], kid=uuid.uuid4().hex)
        with pytest.raises(Unauthenticated, match="unknown key"):
            await sign_in.verify(f"Bearer {made_up}")
    assert idp.fetches == 2  # the first fetch, and one forced refetch for all 50
