"""Signed reservations through the real app: Check signs, the access-log service verifies.

Only an entry carrying a reservation our Check signed, reported once and in time, may change a
workspace's usage; everything else is dropped and counted by reason.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from hashlib import sha256
from typing import Any

import pytest
from envoy.service.auth.v3.external_auth_pb2 import CheckResponse
from google.protobuf.json_format import MessageToDict

from authz.keys import generate_key
from authz.models import CLI_ACTOR, ModelPrice
from authz.usage.events import parse_entry
from authz.usage.replay import MemoryReplayGuard
from authz.usage.reservations import KEY_RETRY_S, MAX_AGE_S, Keyring, claims_for
from ratelimit.limiter import LimitResult, Limits, Quota, RateLimitUnavailable
from ratelimit.memory import InMemoryRateLimiter
from ratelimit.quota import month_period
from tests.support.accesslogs import from_check, log_entry, send
from tests.support.checks import bearer, check_request
from tests.support.clock import FakeClock
from tests.support.fakes import FakeStore, workspace
from tests.unit.conftest import Sidecar, Started, start_sidecar

NOW = 1_790_000_000.0  # 2026-09-21, a fixed wall clock for reservations and the ledger
VICTIM = "ws_victim"
USAGE = {"model": "gpt-4o-2024-08-06", "prompt_tokens": 10, "completion_tokens": 5}


class SwitchableLimiter(InMemoryRateLimiter):
    """The in-process limiter, except that `acquire` fails while `down` (a Redis outage seen
    by Check only)."""

    down = False

    async def acquire(
        self,
        workspace_id: str,
        limits: Limits,
        tokens: int,
        *,
        quota: Quota | None = None,
        spend_micros: int = 0,
    ) -> LimitResult:
        if self.down:
            raise RateLimitUnavailable("redis down")
        return await super().acquire(
            workspace_id, limits, tokens, quota=quota, spend_micros=spend_micros
        )


class World:
    def __init__(self, sidecar: Sidecar, started: Started, limiter: SwitchableLimiter) -> None:
        self.sidecar = sidecar
        self.started = started
        self.limiter = limiter
        self.key = generate_key()
        ws = replace(workspace(VICTIM, tpm=1000), monthly_token_quota=10**6)
        sidecar.store.add(self.key, ws)
        self.limits = Limits(rpm=0, tpm=1000)

    @property
    def clock(self) -> FakeClock[float]:
        return self.sidecar.clock

    def started_at(self) -> datetime:
        return datetime.fromtimestamp(self.clock.now, UTC)

    async def check(self, model: str = "gpt-4o") -> CheckResponse:
        body = json.dumps({"model": model, "max_tokens": 20}).encode()
        response = await self.sidecar.stub.Check(check_request(headers=bearer(self.key), body=body))
        assert response.status.code == 0
        return response

    async def report(self, *responses: CheckResponse, usage: dict[str, object] = USAGE) -> None:
        entries = [from_check(r, usage, started=self.started_at()) for r in responses]
        await send(self.sidecar.address, entries)

    def ledger_tokens(self) -> int:
        rows = [r for batch in self.sidecar.store.batches.values() for r in batch]
        return sum(r.prompt_tokens + r.completion_tokens for r in rows if r.workspace_id == VICTIM)

    async def quota_used(self) -> int:
        quota = Quota(period=month_period(self.clock.now), token_quota=10**6, spend_cap_micros=None)
        result = await self.limiter.acquire(VICTIM, Limits(rpm=0, tpm=0), 0, quota=quota)
        assert result.quota is not None
        return result.quota.tokens_used

    async def tokens_left(self) -> int:
        return (await self.limiter.acquire(VICTIM, self.limits, 0)).tokens.remaining

    def refused(self, reason: str) -> float:
        value: float = self.sidecar.metrics.entries_refused.labels(reason)._value.get()
        return value


@pytest.fixture
async def world() -> AsyncIterator[World]:
    clock = FakeClock(NOW)
    limiter = SwitchableLimiter(clock_ms=clock.ms)
    sidecar, started = await start_sidecar(fail_open=True, limiter=limiter, clock=clock)
    await sidecar.store.set_price(ModelPrice("gpt-4o", 2.5, 10.0), actor=CLI_ACTOR)
    await started.app.accountant.load_prices()
    yield World(sidecar, started, limiter)
    await started.stop()


def metadata(response: CheckResponse) -> dict[str, object]:
    fields: dict[str, object] = MessageToDict(response.dynamic_metadata)
    return fields


async def test_an_allow_carries_a_reservation_signed_over_the_requested_model_and_price(
    world: World,
) -> None:
    response = await world.check()
    fields = metadata(response)
    assert fields["requested_model"] == "gpt-4o"
    assert (fields["price_input_per_1m_usd"], fields["price_output_per_1m_usd"]) == (2.5, 10.0)
    assert fields["reserved_at"] == NOW
    assert len(str(fields["reservation_id"])) == 24
    assert len(str(fields["reservation_mac"])) == 64
    event = parse_entry(from_check(response, USAGE, started=world.started_at()))
    assert event is not None
    assert event.claims is not None
    keyring = world.started.app.keyring
    assert await keyring.verify(event.claims, key_id=event.signing_key, mac=event.mac)
    for tampered in (
        replace(event.claims, workspace_id="ws_other"),
        replace(event.claims, reserved_tokens=event.claims.reserved_tokens + 1),
        replace(event.claims, price_in=0.0),
        replace(event.claims, model="gpt-4o-mini"),
        replace(event.claims, reserved_at=event.claims.reserved_at + 1),
    ):
        assert not await keyring.verify(tampered, key_id=event.signing_key, mac=event.mac)
    # Two allows never share an id.
    assert metadata(await world.check())["reservation_id"] != fields["reservation_id"]


async def test_a_forged_entry_for_another_workspace_changes_nothing(world: World) -> None:
    genuine = await world.check()
    await world.report(genuine)
    ledger, quota, bucket = (
        world.ledger_tokens(),
        await world.quota_used(),
        await world.tokens_left(),
    )
    assert (ledger, quota) == (15, 15)
    key_id = metadata(genuine)["key_id"]
    forged_usage = {"model": "forged", "prompt_tokens": 999999999, "completion_tokens": 0}
    unsigned = {
        "decision": "allow",
        "workspace_id": VICTIM,
        "key_id": key_id,
        "reserved_tokens": 999999,
    }
    # The attacker's own guess at a MAC, and a genuine one moved onto other claims.
    bad_mac = {**metadata(genuine), "reserved_tokens": 999999, "reservation_id": "f" * 24}
    await send(
        world.sidecar.address,
        [log_entry(unsigned, forged_usage, started=world.started_at())],
        [log_entry(bad_mac, {**forged_usage, "prompt_tokens": 0}, started=world.started_at())],
    )
    assert (world.refused("unsigned"), world.refused("bad_mac")) == (1, 1)
    assert world.ledger_tokens() == ledger
    assert await world.quota_used() == quota
    assert await world.tokens_left() == bucket  # no refund of a reservation never made


async def test_a_genuine_entry_replayed_counts_once(world: World) -> None:
    genuine = await world.check()
    await world.report(genuine)
    await world.report(genuine, genuine)
    assert world.ledger_tokens() == 15
    assert await world.quota_used() == 15
    assert world.refused("replay") == 2


async def test_an_entry_older_than_a_reservation_lives_is_refused(world: World) -> None:
    genuine = await world.check()
    world.clock.now += MAX_AGE_S + 1
    await world.report(genuine)
    assert world.refused("too_old") == 1
    assert world.ledger_tokens() == 0


async def test_a_rotation_keeps_old_reservations_valid_for_the_overlap_only(world: World) -> None:
    before = await world.check()
    store = world.sidecar.store
    await store.rotate_signing_key(overlap=timedelta(hours=2))
    world.clock.now += 61  # every replica reads the keys again within a minute
    await world.check()  # the reload runs in the background of a Check, never in its way
    await world.started.app.keyring.settle()
    after = await world.check()
    assert metadata(after)["reservation_key"] != metadata(before)["reservation_key"]
    await world.report(before, after)
    assert world.ledger_tokens() == 30

    # A rotation with no overlap (a leaked secret): what the old key signed stops counting.
    stale = await world.check()
    await store.rotate_signing_key(overlap=timedelta(0))
    world.clock.now += 61
    await world.check()
    await world.started.app.keyring.settle()
    await world.report(stale)
    assert world.refused("bad_mac") == 1
    assert world.ledger_tokens() == 30


async def test_a_fail_open_allow_reserves_and_refunds_nothing(world: World) -> None:
    assert (await world.limiter.acquire(VICTIM, world.limits, 400)).tokens.remaining == 600
    world.limiter.down = True
    failed, reported, unreported = [await world.check() for _ in range(3)]
    world.limiter.down = False
    fields = metadata(failed)
    assert (fields["fail_open"], fields["reserved_tokens"], fields["took_from_buckets"]) == (
        True,
        0,
        False,
    )
    estimate = int(fields["estimate_tokens"])  # type: ignore[call-overload]
    assert estimate == 30  # what it would have reserved: 37 body bytes / 4 + max_tokens 20
    # The upstream failed: no usage. A refund of a reservation never taken would lift the
    # bucket above what is really left.
    no_usage = log_entry(failed.dynamic_metadata, {}, started=world.started_at(), status=502)
    await send(world.sidecar.address, [no_usage])
    assert world.ledger_tokens() == 0
    assert await world.tokens_left() == 600
    assert world.sidecar.metrics.reconciliations.labels("no_usage")._value.get() == 1
    # Nor is it charged what it used: the bucket was never asked. The month counts it all, and
    # unknown usage is charged the signed estimate, never nothing.
    await world.report(reported)
    await world.report(unreported, usage={})
    assert await world.tokens_left() == 600
    assert world.ledger_tokens() == 15
    assert await world.quota_used() == 15 + estimate


async def test_what_a_request_took_from_the_buckets_is_signed(world: World) -> None:
    world.limiter.down = True
    untaken = metadata(await world.check())
    world.limiter.down = False
    taken = metadata(await world.check())
    assert (untaken["took_from_buckets"], untaken["estimate_tokens"]) == (False, 30)
    # One that took its estimate carries the metadata (and the MAC) it always did.
    assert taken["reserved_tokens"] == 30
    assert "took_from_buckets" not in taken
    assert "estimate_tokens" not in taken
    # Passed off as one that took its estimate, it would be refunded one never taken.
    forgeries = [
        {**untaken, "took_from_buckets": True},
        {**untaken, "took_from_buckets": True, "reserved_tokens": 30},
        {**untaken, "estimate_tokens": 1},
        {k: v for k, v in untaken.items() if k not in ("took_from_buckets", "estimate_tokens")},
        {**taken, "took_from_buckets": False},
        {**taken, "estimate_tokens": 1},
        {**taken, "estimate_tokens": 30, "took_from_buckets": False},
    ]
    await send(
        world.sidecar.address,
        [log_entry(f, USAGE, started=world.started_at()) for f in forgeries],
    )
    assert world.refused("bad_mac") == len(forgeries)
    assert world.ledger_tokens() == 0


def v1_mac(secret: bytes, fields: dict[str, Any], workspace_id: str, key_id: str) -> str:
    """The MAC as a replica from before `estimate_tokens` computes it (the v1 message)."""
    rid, model = fields["reservation_id"], fields["requested_model"]
    price_in, price_out = fields["price_input_per_1m_usd"], fields["price_output_per_1m_usd"]
    message = (
        f"v1|{len(rid)}:{rid}|{len(workspace_id)}:{workspace_id}|{len(key_id)}:{key_id}"
        f"|{len(model)}:{model}|{int(fields['reserved_tokens'])}|{int(fields['reserved_at'])}"
        f"|{float(price_in)!r}|{float(price_out)!r}"
    )
    return hmac.new(secret, message.encode(), sha256).hexdigest()


async def test_an_older_replicas_reservation_still_counts_as_it_did(world: World) -> None:
    """A rolling upgrade: entries an older replica signed (v1, no estimate) verify and are
    charged as before, and a newer replica signs an allow that took its estimate exactly as an
    older one does, so the older one verifies it too."""
    current, *_ = await world.sidecar.store.signing_keys()
    taken = metadata(await world.check())
    key_id = str(taken["key_id"])
    assert taken["reservation_mac"] == v1_mac(current.secret, taken, VICTIM, key_id)
    # An older replica's fail-open allow: reserved 0, and charged all it used, as then.
    older: dict[str, Any] = {
        "decision": "allow",
        "workspace_id": VICTIM,
        "key_id": key_id,
        "fail_open": True,
        "reserved_tokens": 0,
        "reservation_id": "0" * 24,
        "reservation_key": current.id,
        "reserved_at": int(world.clock.now),
        "requested_model": "gpt-4o",
        "price_input_per_1m_usd": 2.5,
        "price_output_per_1m_usd": 10.0,
    }
    older["reservation_mac"] = v1_mac(current.secret, older, VICTIM, key_id)
    before = await world.tokens_left()
    await send(world.sidecar.address, [log_entry(older, USAGE, started=world.started_at())])
    assert world.refused("bad_mac") == 0
    assert world.ledger_tokens() == 15
    assert await world.tokens_left() == before - 15


async def test_refusals_warn_at_a_limited_rate_with_ids_only(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    genuine = await world.check()
    mac = str(metadata(genuine)["reservation_mac"])
    forged = {**metadata(genuine), "reserved_tokens": 1}
    with caplog.at_level(logging.WARNING, logger="authz.usage.accesslog"):
        await send(
            world.sidecar.address,
            [log_entry(forged, USAGE, started=world.started_at()) for _ in range(50)],
        )
    warnings = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(warnings) == 1
    assert world.refused("bad_mac") == 50
    assert str(metadata(genuine)["reservation_id"]) in warnings[0]
    assert mac not in warnings[0]
    assert "gpt-4o" not in warnings[0]


async def test_memory_replay_guard_forgets_ids_after_their_ttl() -> None:
    clock = FakeClock(0.0)
    guard = MemoryReplayGuard(clock=clock)
    assert await guard.first_report("ws", "r1", ttl_s=10)
    assert not await guard.first_report("ws", "r1", ttl_s=10)
    clock.now = 10.0
    assert await guard.first_report("ws", "r1", ttl_s=10)


async def test_a_mac_that_is_not_even_hex_is_refused_and_the_stream_goes_on(world: World) -> None:
    genuine = await world.check()
    garbled = {**metadata(genuine), "reservation_mac": "é" * 64}
    await send(
        world.sidecar.address,
        [log_entry(garbled, USAGE, started=world.started_at())],
        [from_check(genuine, USAGE, started=world.started_at())],
    )
    assert world.refused("bad_mac") == 1
    assert world.ledger_tokens() == 15


async def test_a_replica_that_could_not_read_its_keys_tries_again_within_a_second(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = FakeStore()
    await store.migrate()
    store.down = True
    clock = FakeClock(0.0)
    keyring = Keyring(store, clock=clock)
    with caplog.at_level(logging.WARNING, logger="authz.usage.reservations"):
        await keyring.load()
    assert "cannot read the signing keys" in caplog.text
    claims = claims_for(
        workspace_id="ws", key_id="key", reserved_tokens=1, now_ts=0.0, model="m", price=None
    )
    assert keyring.sign(claims) is None  # unsigned: its usage would not count
    store.down = False
    clock.now = KEY_RETRY_S
    assert keyring.sign(claims) is None  # this one starts the read, in the background
    await keyring.settle()
    signed = keyring.sign(claims)
    assert signed is not None
    assert await keyring.verify(claims, key_id=signed.key_id, mac=signed.mac)


async def test_a_forged_entry_adds_no_latency_row(world: World) -> None:
    def latency_rows() -> list[tuple[str, int]]:
        store = world.sidecar.store
        return [(r.workspace_id, r.count) for lat, _ in store.observations.values() for r in lat]

    genuine = await world.check()
    forged = {
        "decision": "allow",
        "workspace_id": VICTIM,
        "key_id": str(metadata(genuine)["key_id"]),
        "reserved_tokens": 10,
    }
    entries = [
        log_entry(forged, USAGE, started=world.started_at()),
        log_entry(
            {**metadata(genuine), "reservation_mac": "0" * 64}, USAGE, started=world.started_at()
        ),
    ]
    for log in entries:
        log.common_properties.time_to_last_downstream_tx_byte.FromMilliseconds(40)
    await send(world.sidecar.address, entries)
    assert (world.refused("unsigned"), world.refused("bad_mac")) == (1, 1)
    assert latency_rows() == []
    signed = log_entry(genuine.dynamic_metadata, USAGE, started=world.started_at())
    signed.common_properties.time_to_last_downstream_tx_byte.FromMilliseconds(40)
    await send(world.sidecar.address, [signed])
    assert latency_rows() == [(VICTIM, 1)]


async def test_denials_come_from_check_never_from_an_entry(world: World) -> None:
    def denial_rows() -> list[tuple[str, str, str, int]]:
        store = world.sidecar.store
        return [
            (r.workspace_id, r.key_id, r.reason, r.count)
            for _, denials in store.observations.values()
            for r in denials
        ]

    key_id = str(metadata(await world.check())["key_id"])
    forged = {
        "decision": "deny",
        "workspace_id": VICTIM,
        "key_id": key_id,
        "code": "insufficient_quota",
        "type": "insufficient_quota",
    }
    await send(
        world.sidecar.address, [log_entry(forged, None, started=world.started_at(), status=429)]
    )
    assert denial_rows() == []
    too_large = json.dumps({"model": "gpt-4o", "max_tokens": 5000}).encode()
    denied = await world.sidecar.stub.Check(
        check_request(headers=bearer(world.key), body=too_large)
    )
    assert denied.denied_response.status.code == 429
    await send(world.sidecar.address, [])  # the next write of the access-log stream
    assert denial_rows() == [(VICTIM, key_id, "rate_limit_tokens", 1)]
