"""Signed reservations: the proof that an access-log entry describes a request our Check allowed.

Every allow carries, in its ext_authz dynamic metadata, a reservation id and an HMAC-SHA256
over what the access-log service will act on (workspace, key, reserved tokens, time, the model
asked for and its price then, and for a request that took nothing from the buckets, that fact and
its Check-time estimate). The secrets live in the store (`authz migrate` makes the first,
`authz signing-key rotate` the next), so every replica verifies every other one's reservations.
The usage numbers themselves come from Envoy's filters and are not signed: the threat answered
here is a caller of the gRPC port other than Envoy (docs/deploy.md, "Who can reach the gRPC
port").
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from hashlib import sha256

from authz.models import ModelPrice
from authz.store.base import SigningKey, Store, StoreUnavailable

log = logging.getLogger(__name__)

MAX_AGE_S = 3600
"""An entry whose reservation is older than this is refused (too_old): no request runs an hour,
and the replay memory need keep ids only this long."""
CLOCK_SKEW_S = 300
"""How far in the future another replica's clock may put a reservation."""
REPLAY_TTL_S = MAX_AGE_S + CLOCK_SKEW_S
ROTATION_OVERLAP = timedelta(hours=2)
"""How long a rotated-out secret still verifies: a reservation's whole life (MAX_AGE_S) plus the
time every replica takes to start signing with the new one (KEY_RELOAD_S), with room to spare."""
KEY_RELOAD_S = 60.0
"""How often a replica reads the signing keys again, to pick up a rotation."""
KEY_RETRY_S = 1.0
"""How soon a replica without any key (the database did not answer) tries again: until then
its allows are unsigned, and their usage is not counted."""

TEXT_LIMIT = 128
"""Characters of a text field the access-log parser keeps; a signed model is cut to this too."""

# Field names in the envoy.filters.http.ext_authz metadata namespace.
ID_FIELD = "reservation_id"
MAC_FIELD = "reservation_mac"
KID_FIELD = "reservation_key"
TIME_FIELD = "reserved_at"
MODEL_FIELD = "requested_model"
PRICE_IN_FIELD = "price_input_per_1m_usd"
PRICE_OUT_FIELD = "price_output_per_1m_usd"
ESTIMATE_FIELD = "estimate_tokens"
TOOK_FIELD = "took_from_buckets"


@dataclass(frozen=True, slots=True)
class Claims:
    """What a MAC vouches for. Prices are USD per 1M tokens at Check time (0 when unpriced)."""

    reservation_id: str
    workspace_id: str
    key_id: str
    reserved_tokens: int
    """What the request took from the TPM bucket (0 when it took nothing)."""
    reserved_at: int
    model: str
    price_in: float
    price_out: float
    estimate_tokens: int | None = None
    """The Check-time estimate, what the request would reserve (None: `reserved_tokens`, as an
    entry from a replica that signs no estimate says)."""
    took_from_buckets: bool = True
    """False for a shadow workspace's would-be denial and a fail-open allow: admitted without
    taking anything from the buckets, so their usage is not theirs to charge."""

    @property
    def estimate(self) -> int:
        return self.reserved_tokens if self.estimate_tokens is None else self.estimate_tokens

    @property
    def v1(self) -> bool:
        """A request that took its estimate says nothing v1 (an older replica's format) could
        not: it is signed, and its metadata written, exactly as v1, so replicas of either
        version verify it during a rolling upgrade. Only one that took nothing is v2."""
        estimate = self.estimate_tokens  # not self.estimate: this runs on every allow
        return self.took_from_buckets and (estimate is None or estimate == self.reserved_tokens)

    def message(self) -> bytes:
        # The texts are length-prefixed, so no choice of values can be re-split into another
        # claim; the numbers follow in a fixed order. One format call: this is the hot path.
        rid, ws, key, model = self.reservation_id, self.workspace_id, self.key_id, self.model
        text = (
            f"v1|{len(rid)}:{rid}|{len(ws)}:{ws}|{len(key)}:{key}|{len(model)}:{model}"
            f"|{self.reserved_tokens}|{self.reserved_at}|{self.price_in!r}|{self.price_out!r}"
        )
        if not self.v1:
            # Rare (shadow would-be denials, fail-open), so built from v1's text: the prefix
            # keeps every v2 message apart from every v1 one.
            text = f"v2{text[2:]}|{self.estimate}|{self.took_from_buckets:d}"
        return text.encode()

    @property
    def price(self) -> ModelPrice:
        return ModelPrice(self.model, self.price_in, self.price_out)


@dataclass(frozen=True, slots=True)
class Signed:
    """The signature fields an allow's metadata carries, beside the claims."""

    claims: Claims
    key_id: str
    mac: str

    def metadata(self) -> dict[str, str | int | float | bool]:
        claims = self.claims
        fields: dict[str, str | int | float | bool] = {
            ID_FIELD: claims.reservation_id,
            MAC_FIELD: self.mac,
            KID_FIELD: self.key_id,
            TIME_FIELD: claims.reserved_at,
            MODEL_FIELD: claims.model,
            PRICE_IN_FIELD: claims.price_in,
            PRICE_OUT_FIELD: claims.price_out,
        }
        if not claims.v1:
            # Absent, they read back as "took its reserved_tokens": nothing to add on the hot
            # path of an ordinary allow.
            fields[ESTIMATE_FIELD] = claims.estimate
            fields[TOOK_FIELD] = claims.took_from_buckets
        return fields


def new_reservation_id() -> str:
    return secrets.token_hex(12)


def claims_for(
    *,
    workspace_id: str,
    key_id: str,
    reserved_tokens: int,
    now_ts: float,
    model: str | None,
    price: ModelPrice | None,
    estimate_tokens: int | None = None,
    took_from_buckets: bool = True,
) -> Claims:
    """The claims of a fresh reservation (a new random id)."""
    return Claims(
        reservation_id=new_reservation_id(),
        workspace_id=workspace_id,
        key_id=key_id,
        reserved_tokens=reserved_tokens,
        reserved_at=int(now_ts),
        # Sign what the access-log parser will read back.
        model=(model or "")[:TEXT_LIMIT],
        price_in=0.0 if price is None else float(price.input_per_1m_usd),
        price_out=0.0 if price is None else float(price.output_per_1m_usd),
        estimate_tokens=estimate_tokens,
        took_from_buckets=took_from_buckets,
    )


class Keyring:
    """The signing keys this process knows, each with its HMAC state precomputed (the key's
    inner and outer pads), so a signature is one `copy` and one short update."""

    def __init__(
        self, store: Store, *, clock: Callable[[], float], reload_s: float = KEY_RELOAD_S
    ) -> None:
        self._store = store
        self._clock = clock
        self._reload_s = reload_s
        self._current: tuple[str, hmac.HMAC] | None = None
        self._by_id: dict[str, hmac.HMAC] = {}
        self._loaded_at = float("-inf")
        self._reloading: asyncio.Task[None] | None = None

    def replace(self, keys: Sequence[SigningKey]) -> None:
        """Adopt `keys` (the store's order: current first)."""
        by_id = {k.id: hmac.new(k.secret, digestmod=sha256) for k in keys}
        self._by_id = by_id
        self._current = (keys[0].id, by_id[keys[0].id]) if keys else None

    async def load(self) -> None:
        """Read the keys from the store; on failure keep those in hand (and say so)."""
        self._loaded_at = self._clock()
        try:
            keys = await self._store.signing_keys()
        except StoreUnavailable as error:
            log.warning(
                "reservations: cannot read the signing keys, keeping %d: %s",
                len(self._by_id),
                error,
            )
            return
        if not keys:
            log.warning("reservations: the store has no signing key: run `authz migrate`")
        self.replace(keys)

    async def settle(self) -> None:
        """Wait for a reload the clock started in the background, if any (tests use it)."""
        if self._reloading is not None:
            await self._reloading

    def _maybe_reload(self) -> None:
        wait = self._reload_s if self._current is not None else KEY_RETRY_S
        if self._clock() - self._loaded_at < wait:
            return
        if self._reloading is not None and not self._reloading.done():
            return
        self._loaded_at = self._clock()
        self._reloading = asyncio.get_running_loop().create_task(self.load())

    def sign(self, claims: Claims) -> Signed | None:
        """The signature with the current key; None while this process has no key yet."""
        self._maybe_reload()
        if self._current is None:
            return None
        key_id, base = self._current
        mac = base.copy()
        mac.update(claims.message())
        return Signed(claims, key_id, mac.hexdigest())

    async def verify(self, claims: Claims, *, key_id: str, mac: str) -> bool:
        """True if `mac` is a valid signature of `claims` by a key still in force."""
        self._maybe_reload()
        base = self._by_id.get(key_id)
        if base is None and self._clock() - self._loaded_at >= KEY_RETRY_S:
            # A key another replica made since our last read (a rotation): read again, at most
            # once a second however many unknown ids an attacker sends.
            await self.load()
            base = self._by_id.get(key_id)
        if base is None:
            return False
        expected = base.copy()
        expected.update(claims.message())
        # As bytes: compare_digest refuses non-ASCII str, and `mac` is whatever was sent.
        return hmac.compare_digest(expected.hexdigest().encode(), mac.encode())
