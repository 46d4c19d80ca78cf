"""Fakes at the Store protocol boundary, for unit tests only.

`FakeStore` keeps its data in dicts but follows the whole protocol: the same validation, key
limit, rotation rules, audit texts, ledger and change feed as the SQL stores (it calls the same
rule functions in `authz.store.common`). The store contract suite (tests/integration/
test_store.py, test_ledger_store.py) runs against it and both real stores, so it cannot lie.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from authz.keys import hash_key, mask_key, new_key_id, new_workspace_id
from authz.migrations import load_migrations
from authz.models import (
    Actor,
    ApiKey,
    AuditEntry,
    Enforcement,
    KeyGrant,
    ModelPrice,
    NewKey,
    NewWorkspace,
    UsageRow,
    Workspace,
    WorkspaceUpdate,
)
from authz.store.base import (
    PRICES_AUDIT,
    Change,
    ChangeKind,
    ChangeSink,
    Conflict,
    LedgerMark,
    LedgerSnapshot,
    NotFound,
    SigningKey,
    StoreUnavailable,
    utc_now,
)
from authz.store.common import (
    LEDGER_SUMS,
    apply_update,
    check_grace,
    check_key_limit,
    check_label,
    check_new_workspace,
    check_price,
    check_rotatable,
    grace_deadline,
    is_live,
    price_change,
    rotation_audit,
    workspace_change,
)
from authz.store.sql_ledger import months_of
from authz.store.sql_signing import new_signing_key, retire_at
from authz.usage.observed import DenialRow, LatencyRow
from authz.usage.periods import period_bounds

_T = TypeVar("_T")
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


def ledger_row(workspace_id: str, key_id: str, hour: datetime, tokens: int) -> UsageRow:
    """One ledger row of `tokens` prompt tokens (one request, no spend), for seeding tests."""
    return UsageRow(
        hour=hour,
        workspace_id=workspace_id,
        key_id=key_id,
        model="m",
        requests=1,
        prompt_tokens=tokens,
        completion_tokens=0,
        errors_4xx=0,
        errors_5xx=0,
        spend_usd=0.0,
    )


def workspace(
    ws_id: str = "ws_test",
    *,
    rpm: int = 0,
    tpm: int = 0,
    default_completion: int = 16,
    enforcement: Enforcement = Enforcement.ENFORCE,
) -> Workspace:
    return Workspace(
        id=ws_id,
        name=ws_id,
        rpm=rpm,
        tpm=tpm,
        key_limit=10,
        default_completion_tokens=default_completion,
        monthly_token_quota=None,
        monthly_spend_cap_usd=None,
        created_at=EPOCH,
        updated_at=EPOCH,
        enforcement=enforcement,
    )


class FakeStore:
    """The Store protocol in memory. Test hooks: `lookups` counts key lookups, `down` makes
    every call raise StoreUnavailable (ending an outage resets watchers, as a reconnect does),
    `gate` holds lookups until set. `grants` indexes the live keys by hash; `batches` holds
    each applied ledger batch, from which reports and totals are summed."""

    def __init__(self) -> None:
        self.workspaces: dict[str, Workspace] = {}
        self.grants: dict[bytes, KeyGrant] = {}
        self.keys: dict[str, ApiKey] = {}
        self.hashes: dict[str, bytes] = {}
        self.used: dict[str, datetime] = {}
        self.batches: dict[str, list[UsageRow]] = {}
        self.ledger_marks: dict[tuple[str, str], dict[str, int]] = {}
        self.observations: dict[str, tuple[list[LatencyRow], list[DenialRow]]] = {}
        self.prices: dict[str, ModelPrice] = {}
        self.signing: list[SigningKey] = []
        self.audit: list[AuditEntry] = []
        self.lookups = 0
        self.gate: asyncio.Event | None = None
        self._down = False
        self._migrated = False
        self._feeds: list[asyncio.Queue[Change | None]] = []

    def another(self) -> FakeStore:
        """A second connection to the same data (another replica, or the CLI)."""
        other = FakeStore()
        for name in (
            "workspaces",
            "grants",
            "keys",
            "hashes",
            "used",
            "batches",
            "observations",
            "prices",
            "signing",
        ):
            setattr(other, name, getattr(self, name))
        other.audit = self.audit
        other._feeds = self._feeds
        other._migrated = self._migrated
        return other

    @property
    def down(self) -> bool:
        return self._down

    @down.setter
    def down(self, value: bool) -> None:
        if self._down and not value:
            # Back from an outage a real feed has reconnected: changes may have been missed.
            for feed in self._feeds:
                feed.put_nowait(None)
        self._down = value

    def add(self, secret: str, ws: Workspace, *, expires_at: datetime | None = None) -> KeyGrant:
        """Seed a key (and its workspace) without audit or announcement."""
        self.workspaces[ws.id] = ws
        key = ApiKey(new_key_id(), ws.id, ws.id, mask_key(secret), EPOCH, None, None, expires_at)
        self._store_key(key, hash_key(secret))
        return self.grants[hash_key(secret)]

    async def migrate(self) -> list[int]:
        self._up()
        applied = [] if self._migrated else [m.version for m in load_migrations("sqlite")]
        self._migrated = True
        if not any(k.retires_at is None for k in self.signing):
            self.signing.append(new_signing_key(utc_now()))
        return applied

    async def ping(self) -> None:
        self._up()

    async def lookup_key(self, key_hash: bytes) -> tuple[KeyGrant, Workspace] | None:
        self.lookups += 1
        if self.gate is not None:
            await self.gate.wait()
        self._up()
        grant = self.grants.get(key_hash)
        return None if grant is None else (grant, self.workspaces[grant.workspace_id])

    async def get_workspace(self, workspace_id: str) -> Workspace | None:
        self._up()
        return self.workspaces.get(workspace_id)

    async def list_workspaces(self) -> list[Workspace]:
        self._up()
        return sorted(self.workspaces.values(), key=lambda w: w.created_at)

    async def create_workspace(self, new: NewWorkspace, *, actor: Actor) -> Workspace:
        new = check_new_workspace(new)
        self._up()
        self._check_unique_name(new.name, None)
        now = utc_now()
        created = Workspace(
            id=new_workspace_id(),
            name=new.name,
            rpm=new.rpm,
            tpm=new.tpm,
            key_limit=new.key_limit,
            default_completion_tokens=new.default_completion_tokens,
            monthly_token_quota=new.monthly_token_quota,
            monthly_spend_cap_usd=new.monthly_spend_cap_usd,
            created_at=now,
            updated_at=now,
            enforcement=new.enforcement,
            streaming_usage=new.streaming_usage,
        )
        self.workspaces[created.id] = created
        self._audit(now, created.id, None, "workspace.create", actor, new.name)
        return created

    async def update_workspace(
        self, workspace_id: str, update: WorkspaceUpdate, *, actor: Actor
    ) -> Workspace:
        self._up()
        now = utc_now()
        current = self._workspace(workspace_id)
        updated = apply_update(current, update, updated_at=now)
        self._check_unique_name(updated.name, workspace_id)
        self.workspaces[workspace_id] = updated
        detail = workspace_change(current, updated)
        self._audit(now, workspace_id, None, "workspace.update", actor, detail)
        self._announce(Change(ChangeKind.WORKSPACE, workspace_id))
        return updated

    async def create_key(self, new: NewKey, *, actor: Actor) -> ApiKey:
        label = check_label(new.label)
        self._up()
        now = utc_now()
        limit = self._workspace(new.workspace_id).key_limit
        check_key_limit(self._active_keys(new.workspace_id, now), limit)
        key = ApiKey(new.id, new.workspace_id, label, new.mask, now, None, None, new.expires_at)
        self._store_key(key, new.key_hash)
        self._audit(now, new.workspace_id, new.id, "key.create", actor, label)
        self._announce(Change(ChangeKind.KEY, new.key_hash.hex()))
        return self._key(new.id)

    async def get_key(self, key_id: str) -> ApiKey | None:
        self._up()
        return self._key(key_id) if key_id in self.keys else None

    async def get_key_by_hash(self, key_hash: bytes) -> ApiKey | None:
        self._up()
        found = [key_id for key_id, h in self.hashes.items() if h == key_hash]
        return self._key(found[0]) if found else None

    async def list_keys(self, workspace_id: str) -> list[ApiKey]:
        self._up()
        mine = [self._key(k.id) for k in self.keys.values() if k.workspace_id == workspace_id]
        return sorted(mine, key=lambda k: (k.created_at, k.id))

    async def revoke_key(self, key_id: str, *, actor: Actor, reason: str = "revoked") -> ApiKey:
        self._up()
        now = utc_now()
        if key_id not in self.keys:
            raise NotFound(f"no key {key_id}")
        key = self.keys[key_id]
        if key.revoked_at is None:
            self.keys[key_id] = replace(key, revoked_at=now)
            self.grants.pop(self.hashes[key_id], None)
            self._audit(now, key.workspace_id, key_id, "key.revoke", actor, reason)
        self._announce(Change(ChangeKind.KEY, self.hashes[key_id].hex()))
        return self._key(key_id)

    async def rotate_key(
        self, key_id: str, replacement: NewKey, *, actor: Actor, old_expires_at: datetime | None
    ) -> tuple[ApiKey, ApiKey]:
        label = check_label(replacement.label)
        self._up()
        now = utc_now()
        check_grace(old_expires_at, now)
        workspace_id = replacement.workspace_id
        old = self.keys.get(key_id)
        if workspace_id not in self.workspaces or old is None or old.workspace_id != workspace_id:
            raise NotFound(f"no key {key_id} in workspace {workspace_id}")
        check_rotatable(key_id, old.revoked_at, old.expires_at, now)
        limit = self.workspaces[workspace_id].key_limit
        check_key_limit(self._active_keys(workspace_id, now), limit, replacing=True)
        new = ApiKey(replacement.id, workspace_id, label, replacement.mask, now, None, None, None)
        self._store_key(new, replacement.key_hash)
        deadline = grace_deadline(old.expires_at, old_expires_at)
        self._store_key(replace(old, expires_at=deadline), self.hashes[key_id])
        created, rotated = rotation_audit(label, key_id, replacement.id, deadline)
        self._audit(now, workspace_id, replacement.id, "key.create", actor, created)
        self._audit(now, workspace_id, key_id, "key.rotate", actor, rotated)
        self._announce(Change(ChangeKind.KEY, self.hashes[key_id].hex()))
        self._announce(Change(ChangeKind.KEY, replacement.key_hash.hex()))
        return self._key(key_id), self._key(replacement.id)

    async def record_key_use(self, last_used: Mapping[str, datetime]) -> None:
        self._up()
        for key_id, at in last_used.items():
            if key_id in self.keys and (key_id not in self.used or self.used[key_id] < at):
                self.used[key_id] = at

    async def list_audit(self, workspace_id: str) -> list[AuditEntry]:
        self._up()
        return [entry for entry in self.audit if entry.workspace_id == workspace_id]

    async def usage_report(
        self,
        *,
        workspace_id: str | None = None,
        key_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[UsageRow]:
        self._up()
        ledger: dict[tuple[datetime, str, str, str], UsageRow] = {}
        for row in (r for rows in self.batches.values() for r in rows):
            slot = (row.hour, row.workspace_id, row.key_id, row.model)
            held = ledger.get(slot)
            ledger[slot] = row if held is None else _added(held, row)
        return [
            row
            for slot, row in sorted(ledger.items())
            if (workspace_id is None or row.workspace_id == workspace_id)
            and (key_id is None or row.key_id == key_id)
            and (since is None or row.hour >= since)
            and (until is None or row.hour < until)
        ]

    async def apply_usage_batch(
        self, batch_id: str, rows: Sequence[UsageRow], *, mark: LedgerMark | None = None
    ) -> bool:
        self._up()
        if batch_id in self.batches:
            return False
        self.batches[batch_id] = list(rows)
        if mark is not None:
            for workspace_id, period in months_of(rows):
                held = self.ledger_marks.get((workspace_id, period), {})
                if held.get(mark.replica_id, -1) < mark.position:
                    held[mark.replica_id] = mark.position
                self.ledger_marks[(workspace_id, period)] = held
        return True

    async def ledger_snapshot(self, workspace_id: str, period: str) -> LedgerSnapshot:
        start, end = period_bounds(period)
        tokens, spend = await self.period_totals(workspace_id, start, end)
        marks = dict(self.ledger_marks.get((workspace_id, period), {}))
        return LedgerSnapshot(tokens=tokens, spend_usd=spend, marks=marks)

    async def apply_observation_batch(
        self, batch_id: str, latency: Sequence[LatencyRow], denials: Sequence[DenialRow]
    ) -> bool:
        self._up()
        if batch_id in self.observations:
            return False
        self.observations[batch_id] = (list(latency), list(denials))
        return True

    async def latency_report(
        self, workspace_id: str, since: datetime, until: datetime
    ) -> list[LatencyRow]:
        self._up()
        rows = [r for latency, _ in self.observations.values() for r in latency]
        summed = _summed(
            ((r.hour, r.key_id, r.bucket), r.count)
            for r in rows
            if r.workspace_id == workspace_id and since <= r.hour < until
        )
        return [LatencyRow(h, workspace_id, k, b, n) for (h, k, b), n in sorted(summed.items())]

    async def denial_report(
        self, workspace_id: str, since: datetime, until: datetime
    ) -> list[DenialRow]:
        self._up()
        rows = [r for _, denials in self.observations.values() for r in denials]
        summed = _summed(
            ((r.hour, r.key_id, r.reason), r.count)
            for r in rows
            if r.workspace_id == workspace_id and since <= r.hour < until
        )
        return [DenialRow(h, workspace_id, k, r, n) for (h, k, r), n in sorted(summed.items())]

    async def period_totals(
        self, workspace_id: str, since: datetime, until: datetime
    ) -> tuple[int, float]:
        self._up()
        rows = [r for rows in self.batches.values() for r in rows]
        mine = [r for r in rows if r.workspace_id == workspace_id and since <= r.hour < until]
        return (
            sum(r.tokens for r in mine),
            sum(r.spend_usd for r in mine),
        )

    async def list_prices(self) -> list[ModelPrice]:
        self._up()
        return [self.prices[model] for model in sorted(self.prices)]

    async def set_price(self, price: ModelPrice, *, actor: Actor) -> ModelPrice:
        price = check_price(price)
        self._up()
        now = utc_now()
        stored = replace(price, updated_at=now)
        detail = price_change(self.prices.get(price.model), price)
        self.prices[price.model] = stored
        self._audit(now, PRICES_AUDIT, None, "price.set", actor, detail)
        self._announce(Change(ChangeKind.PRICE, price.model))
        return stored

    async def signing_keys(self) -> list[SigningKey]:
        self._up()
        now = utc_now()
        live = [k for k in self.signing if k.retires_at is None or k.retires_at > now]
        return sorted(live, key=lambda k: (k.retires_at is not None, -k.created_at.timestamp()))

    async def rotate_signing_key(self, *, overlap: timedelta) -> SigningKey:
        self._up()
        now = utc_now()
        key = new_signing_key(now)
        self.signing[:] = [
            replace(k, retires_at=retire_at(k.retires_at, now, overlap)) for k in self.signing
        ]
        self.signing.append(key)
        return key

    async def watch_changes(self, sink: ChangeSink) -> None:
        feed: asyncio.Queue[Change | None] = asyncio.Queue()
        self._feeds.append(feed)
        try:
            # As the real feeds do once they listen: what came before may have been missed.
            sink.on_reset()
            while True:
                change = await feed.get()
                if change is None:
                    sink.on_reset()
                else:
                    sink.on_change(change)
        finally:
            self._feeds.remove(feed)

    async def close(self) -> None:
        return None

    def _up(self) -> None:
        if self._down:
            raise StoreUnavailable("fake outage")

    def _workspace(self, workspace_id: str) -> Workspace:
        if workspace_id not in self.workspaces:
            raise NotFound(f"no workspace {workspace_id}")
        return self.workspaces[workspace_id]

    def _check_unique_name(self, name: str, workspace_id: str | None) -> None:
        if any(w.name == name and w.id != workspace_id for w in self.workspaces.values()):
            raise Conflict(f"a workspace named {name!r} already exists")

    def _active_keys(self, workspace_id: str, now: datetime) -> int:
        return sum(
            1
            for k in self.keys.values()
            if k.workspace_id == workspace_id and is_live(k.revoked_at, k.expires_at, now)
        )

    def _store_key(self, key: ApiKey, key_hash: bytes) -> None:
        if self.hashes.get(key.id, key_hash) != key_hash or any(
            h == key_hash and other != key.id for other, h in self.hashes.items()
        ):
            raise Conflict(f"key {key.id} clashes with a stored key")
        self.keys[key.id] = key
        self.hashes[key.id] = key_hash
        if key.revoked_at is None:
            self.grants[key_hash] = KeyGrant(key.id, key.workspace_id, key.mask, key.expires_at)

    def _key(self, key_id: str) -> ApiKey:
        return replace(self.keys[key_id], last_used_at=self.used.get(key_id))

    def _audit(
        self,
        now: datetime,
        workspace_id: str,
        key_id: str | None,
        action: str,
        actor: Actor,
        detail: str,
    ) -> None:
        self.audit.append(
            AuditEntry(
                at=now,
                workspace_id=workspace_id,
                key_id=key_id,
                action=action,
                actor_kind=actor.kind,
                actor_subject=actor.subject,
                actor_issuer=actor.issuer,
                actor_address=actor.address,
                detail=detail,
            )
        )

    def _announce(self, change: Change) -> None:
        for feed in self._feeds:
            feed.put_nowait(change)


def _added(held: UsageRow, row: UsageRow) -> UsageRow:
    return replace(held, **{name: getattr(held, name) + getattr(row, name) for name in LEDGER_SUMS})


def _summed(counts: Iterable[tuple[_T, int]]) -> dict[_T, int]:
    total: dict[_T, int] = {}
    for slot, count in counts:
        total[slot] = total.get(slot, 0) + count
    return total
