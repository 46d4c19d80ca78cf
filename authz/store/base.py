"""The store interface: one small Protocol, two implementations (SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Protocol

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
from authz.usage.observed import DenialRow, LatencyRow

PRICES_AUDIT = "*"
"""The audit log's workspace id for price changes: prices apply to every workspace."""

CHANGE_CHANNEL = "authz_changes"
"""PostgreSQL NOTIFY channel for revocations and limit changes."""


class StoreError(Exception):
    """Base of the store's typed errors."""


class StoreUnavailable(StoreError):
    """The database did not answer in time or could not be reached."""


class SchemaMissing(StoreUnavailable):
    """The database lacks our schema (or an old version of it): `authz migrate` fixes it."""


class NotFound(StoreError):
    """The named workspace or key does not exist."""


class Conflict(StoreError):
    """The write clashes with existing data (e.g. a duplicate workspace name)."""


class KeyLimitReached(StoreError):
    """The workspace already has as many active keys as its key limit allows."""

    def __init__(self) -> None:
        super().__init__("key limit reached: revoke an unused key before generating a replacement")


class ChangeKind(StrEnum):
    KEY = "key"
    WORKSPACE = "ws"
    PRICE = "price"


@dataclass(frozen=True, slots=True)
class Change:
    """One invalidation: a key (by hash, hex) or a workspace (by id) changed."""

    kind: ChangeKind
    ref: str

    def encode(self) -> str:
        return f"{self.kind.value}:{self.ref}"

    @classmethod
    def decode(cls, payload: str) -> Change | None:
        kind, sep, ref = payload.partition(":")
        if not sep or not ref:
            return None
        try:
            return cls(ChangeKind(kind), ref)
        except ValueError:
            return None


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A deployment secret that signs reservations. `retires_at` is None for the current one;
    a rotated-out key still verifies until then (the overlap). The secret never prints."""

    id: str
    secret: bytes = field(repr=False)
    created_at: datetime
    retires_at: datetime | None


class ChangeSink(Protocol):
    """Receives invalidations from the store's change feed."""

    def on_change(self, change: Change) -> None: ...

    def on_reset(self) -> None:
        """Changes may have been missed (e.g. after a reconnect): drop everything cached."""
        ...


@dataclass(frozen=True, slots=True)
class LedgerMark:
    """Which batch a ledger write is: its replica and position (`ratelimit.marks.position`)."""

    replica_id: str
    position: int


@dataclass(frozen=True, slots=True)
class LedgerSnapshot:
    """A workspace's ledger for one period, read at one instant: the totals and, per replica,
    the highest batch position they include."""

    tokens: int
    spend_usd: float
    marks: Mapping[str, int]


class Store(Protocol):
    """Persistence for workspaces, keys and the audit log."""

    async def migrate(self) -> list[int]:
        """Apply pending schema versions; returns those applied now (idempotent)."""
        ...

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the database answers now."""
        ...

    async def lookup_key(self, key_hash: bytes) -> tuple[KeyGrant, Workspace] | None:
        """The live (unrevoked) key with this hash and its workspace, or None."""
        ...

    async def get_workspace(self, workspace_id: str) -> Workspace | None: ...

    async def list_workspaces(self) -> list[Workspace]: ...

    async def create_workspace(self, new: NewWorkspace, *, actor: Actor) -> Workspace: ...

    async def update_workspace(
        self, workspace_id: str, update: WorkspaceUpdate, *, actor: Actor
    ) -> Workspace: ...

    async def create_key(self, new: NewKey, *, actor: Actor) -> ApiKey:
        """Store a key; raises KeyLimitReached atomically with the insert."""
        ...

    async def get_key(self, key_id: str) -> ApiKey | None: ...

    async def get_key_by_hash(self, key_hash: bytes) -> ApiKey | None:
        """Any key with this hash, revoked or not (scan and audit use it)."""
        ...

    async def list_keys(self, workspace_id: str) -> list[ApiKey]: ...

    async def revoke_key(self, key_id: str, *, actor: Actor, reason: str = "revoked") -> ApiKey:
        """Revoke now (idempotent) and tell every replica."""
        ...

    async def rotate_key(
        self, key_id: str, replacement: NewKey, *, actor: Actor, old_expires_at: datetime | None
    ) -> tuple[ApiKey, ApiKey]:
        """Store `replacement` for the live key `key_id` in one transaction: (old, new).

        The old key stays live, until `old_expires_at` if given (never later than a deadline it
        already has), and every replica drops its cached grant. The key being replaced does not
        count against the limit: a workspace at its limit can rotate without revoking first, yet
        is never more than one key over it. Raises NotFound (no such key in the replacement's
        workspace), Conflict (the old key is revoked or expired) or KeyLimitReached.
        """
        ...

    async def record_key_use(self, last_used: Mapping[str, datetime]) -> None:
        """Batch-write last_used_at per key id; never moves a timestamp backwards."""
        ...

    async def list_audit(self, workspace_id: str) -> list[AuditEntry]: ...

    async def usage_report(
        self,
        *,
        workspace_id: str | None = None,
        key_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[UsageRow]:
        """Ledger rows (hourly) matching every filter given, oldest first."""
        ...

    async def apply_usage_batch(
        self, batch_id: str, rows: Sequence[UsageRow], *, mark: LedgerMark | None = None
    ) -> bool:
        """Add `rows` to the ledger once: False (and no change) if `batch_id` was applied.
        With a `mark`, in the same transaction, raise the replica's mark of every workspace and
        period the rows touch to the batch's position."""
        ...

    async def ledger_snapshot(self, workspace_id: str, period: str) -> LedgerSnapshot:
        """A workspace's totals for a `YYYY-MM` period (tokens reported and estimated, spend in
        USD) and the marks of the batches they include, read consistently."""
        ...

    async def period_totals(
        self, workspace_id: str, since: datetime, until: datetime
    ) -> tuple[int, float]:
        """(tokens reported and estimated, spend in USD) the ledger holds for a workspace in
        [since, until)."""
        ...

    async def apply_observation_batch(
        self, batch_id: str, latency: Sequence[LatencyRow], denials: Sequence[DenialRow]
    ) -> bool:
        """Add latency buckets and denials once: False (no change) if `batch_id` was applied."""
        ...

    async def latency_report(
        self, workspace_id: str, since: datetime, until: datetime
    ) -> list[LatencyRow]:
        """A workspace's latency bucket counts per hour and key in [since, until)."""
        ...

    async def denial_report(
        self, workspace_id: str, since: datetime, until: datetime
    ) -> list[DenialRow]:
        """A workspace's denials per hour, key and reason in [since, until)."""
        ...

    async def list_prices(self) -> list[ModelPrice]: ...

    async def set_price(self, price: ModelPrice, *, actor: Actor) -> ModelPrice:
        """Create or replace a model's price and tell every replica."""
        ...

    async def signing_keys(self) -> list[SigningKey]:
        """The reservation-signing keys still valid now, the current one first."""
        ...

    async def rotate_signing_key(self, *, overlap: timedelta) -> SigningKey:
        """Make a new current key; the previous ones stay valid for `overlap` more (never
        longer than they already had)."""
        ...

    async def watch_changes(self, sink: ChangeSink) -> None:
        """Feed invalidations to `sink` until cancelled; reconnects by itself."""
        ...

    async def close(self) -> None: ...


def utc_now() -> datetime:
    return datetime.now(UTC)
