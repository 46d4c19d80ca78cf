"""Fakes at the Store protocol boundary, for unit tests only."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from authz.keys import hash_key, mask_key, new_key_id
from authz.models import (
    Actor,
    ApiKey,
    AuditEntry,
    KeyGrant,
    ModelPrice,
    NewKey,
    NewWorkspace,
    UsageRow,
    Workspace,
    WorkspaceUpdate,
)
from authz.store.base import ChangeSink, StoreUnavailable

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


def workspace(
    ws_id: str = "ws_test", *, rpm: int = 0, tpm: int = 0, default_completion: int = 16
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
    )


class FakeStore:
    """Keys and workspaces in dicts; counts lookups; can be switched off to simulate an outage."""

    def __init__(self) -> None:
        self.workspaces: dict[str, Workspace] = {}
        self.grants: dict[bytes, KeyGrant] = {}
        self.lookups = 0
        self.down = False
        self.gate: asyncio.Event | None = None
        self.used: dict[str, datetime] = {}
        self.batches: dict[str, list[UsageRow]] = {}
        self.prices: dict[str, ModelPrice] = {}

    def add(self, secret: str, ws: Workspace, *, expires_at: datetime | None = None) -> KeyGrant:
        self.workspaces[ws.id] = ws
        grant = KeyGrant(new_key_id(), ws.id, mask_key(secret), expires_at)
        self.grants[hash_key(secret)] = grant
        return grant

    async def migrate(self) -> list[int]:
        return []

    async def ping(self) -> None:
        if self.down:
            raise StoreUnavailable("fake outage")

    async def lookup_key(self, key_hash: bytes) -> tuple[KeyGrant, Workspace] | None:
        self.lookups += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise StoreUnavailable("fake outage")
        grant = self.grants.get(key_hash)
        return None if grant is None else (grant, self.workspaces[grant.workspace_id])

    async def get_workspace(self, workspace_id: str) -> Workspace | None:
        return self.workspaces.get(workspace_id)

    async def list_workspaces(self) -> list[Workspace]:
        return list(self.workspaces.values())

    async def create_workspace(self, new: NewWorkspace, *, actor: Actor) -> Workspace:
        raise NotImplementedError

    async def update_workspace(
        self, workspace_id: str, update: WorkspaceUpdate, *, actor: Actor
    ) -> Workspace:
        raise NotImplementedError

    async def create_key(self, new: NewKey, *, actor: Actor) -> ApiKey:
        raise NotImplementedError

    async def get_key(self, key_id: str) -> ApiKey | None:
        return None

    async def get_key_by_hash(self, key_hash: bytes) -> ApiKey | None:
        return None

    async def list_keys(self, workspace_id: str) -> list[ApiKey]:
        return []

    async def revoke_key(self, key_id: str, *, actor: Actor, reason: str = "revoked") -> ApiKey:
        raise NotImplementedError

    async def rotate_key(
        self, key_id: str, replacement: NewKey, *, actor: Actor, old_expires_at: datetime | None
    ) -> tuple[ApiKey, ApiKey]:
        raise NotImplementedError

    async def record_key_use(self, last_used: Mapping[str, datetime]) -> None:
        if self.down:
            raise StoreUnavailable("fake outage")
        self.used.update(last_used)

    async def list_audit(self, workspace_id: str) -> list[AuditEntry]:
        return []

    async def usage_report(
        self,
        *,
        workspace_id: str | None = None,
        key_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[UsageRow]:
        return []

    async def apply_usage_batch(self, batch_id: str, rows: Sequence[UsageRow]) -> bool:
        if batch_id in self.batches:
            return False
        self.batches[batch_id] = list(rows)
        return True

    async def period_totals(
        self, workspace_id: str, since: datetime, until: datetime
    ) -> tuple[int, float]:
        rows = [r for rows in self.batches.values() for r in rows]
        mine = [r for r in rows if r.workspace_id == workspace_id and since <= r.hour < until]
        return (
            sum(r.prompt_tokens + r.completion_tokens for r in mine),
            sum(r.spend_usd for r in mine),
        )

    async def list_prices(self) -> list[ModelPrice]:
        return list(self.prices.values())

    async def set_price(self, price: ModelPrice, *, actor: Actor) -> ModelPrice:
        self.prices[price.model] = price
        return price

    async def watch_changes(self, sink: ChangeSink) -> None:
        await asyncio.Event().wait()

    async def close(self) -> None:
        return None
