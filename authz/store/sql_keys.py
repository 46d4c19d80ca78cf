"""Key rules of the SQL store: creation under the key limit, rotation with grace, revocation.

Written once for every dialect; `SqlStore` adds workspaces, the ledger and prices on top.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from authz.models import Actor, ApiKey, KeyGrant, NewKey, Workspace
from authz.store.base import Change, ChangeKind, NotFound, utc_now
from authz.store.common import (
    check_grace,
    check_key_limit,
    check_label,
    check_rotatable,
    grace_deadline,
    rotation_audit,
)
from authz.store.dialect import Dialect, Tx
from authz.store.rows import (
    AUDIT_COLUMNS,
    KEY_COLUMNS,
    LOOKUP_COLUMNS,
    Row,
    grant_from_row,
    key_from_row,
    workspace_from_row,
)

_ACTIVE_KEYS = (
    "SELECT count(*) AS n FROM api_keys WHERE workspace_id = ? AND revoked_at IS NULL "
    "AND (expires_at IS NULL OR expires_at > ?)"
)


class KeyRules(Dialect):
    """The key half of the Store protocol, and the helpers both halves use."""

    async def lookup_key(self, key_hash: bytes) -> tuple[KeyGrant, Workspace] | None:
        row = await self._read(
            lambda tx: tx.fetchrow(
                f"SELECT {LOOKUP_COLUMNS} FROM api_keys k "
                "JOIN workspaces w ON w.id = k.workspace_id "
                "WHERE k.key_hash = ? AND k.revoked_at IS NULL",
                key_hash,
            )
        )
        if row is None:
            return None
        return grant_from_row(row, self._parse_time), self._workspace(row, "ws_")

    async def create_key(self, new: NewKey, *, actor: Actor) -> ApiKey:
        label = check_label(new.label)
        now = utc_now()

        async def work(tx: Tx) -> ApiKey:
            limit = await self._key_limit(tx, new.workspace_id)
            if limit is None:
                raise NotFound(f"no workspace {new.workspace_id}")
            check_key_limit(await self._active_keys(tx, new.workspace_id, now), limit)
            await self._insert_key(tx, new, label, now, expires_at=new.expires_at)
            await self._audit(tx, now, new.workspace_id, new.id, "key.create", actor, label)
            # A hash could sit in a replica's negative cache only if someone guessed the key
            # before it existed; clear it anyway so "created" always means "works".
            await self._announce(tx, now, Change(ChangeKind.KEY, new.key_hash.hex()))
            return await self._key(tx, new.id)

        return await self._write(work)

    async def get_key(self, key_id: str) -> ApiKey | None:
        row = await self._read(
            lambda tx: tx.fetchrow(f"SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?", key_id)
        )
        return None if row is None else key_from_row(row, self._parse_time)

    async def get_key_by_hash(self, key_hash: bytes) -> ApiKey | None:
        row = await self._read(
            lambda tx: tx.fetchrow(
                f"SELECT {KEY_COLUMNS} FROM api_keys WHERE key_hash = ?", key_hash
            )
        )
        return None if row is None else key_from_row(row, self._parse_time)

    async def list_keys(self, workspace_id: str) -> list[ApiKey]:
        rows = await self._read_list(
            f"SELECT {KEY_COLUMNS} FROM api_keys WHERE workspace_id = ? ORDER BY created_at, id",
            workspace_id,
        )
        return [key_from_row(row, self._parse_time) for row in rows]

    async def revoke_key(self, key_id: str, *, actor: Actor, reason: str = "revoked") -> ApiKey:
        now = utc_now()

        async def work(tx: Tx) -> ApiKey:
            row = await tx.fetchrow(
                "SELECT workspace_id, key_hash, revoked_at FROM api_keys WHERE id = ?"
                + self.for_update,
                key_id,
            )
            if row is None:
                raise NotFound(f"no key {key_id}")
            if row["revoked_at"] is None:
                await tx.execute(
                    "UPDATE api_keys SET revoked_at = ? WHERE id = ?", self._t(now), key_id
                )
                await self._audit(tx, now, row["workspace_id"], key_id, "key.revoke", actor, reason)
            await self._announce(tx, now, Change(ChangeKind.KEY, bytes(row["key_hash"]).hex()))
            return await self._key(tx, key_id)

        # Revoking twice changes nothing, so a dropped connection may safely try again.
        return await self._write(work, idempotent=True)

    async def rotate_key(
        self, key_id: str, replacement: NewKey, *, actor: Actor, old_expires_at: datetime | None
    ) -> tuple[ApiKey, ApiKey]:
        label = check_label(replacement.label)
        now = utc_now()
        check_grace(old_expires_at, now)
        workspace_id = replacement.workspace_id

        async def work(tx: Tx) -> tuple[ApiKey, ApiKey]:
            # The workspace row lock serializes rotations with creates, as in create_key.
            limit = await self._key_limit(tx, workspace_id)
            old = await tx.fetchrow(
                "SELECT key_hash, revoked_at, expires_at FROM api_keys "
                "WHERE id = ? AND workspace_id = ?" + self.for_update,
                key_id,
                workspace_id,
            )
            if limit is None or old is None:
                raise NotFound(f"no key {key_id} in workspace {workspace_id}")
            current = self._maybe_time(old["expires_at"])
            check_rotatable(key_id, self._maybe_time(old["revoked_at"]), current, now)
            check_key_limit(await self._active_keys(tx, workspace_id, now), limit, replacing=True)
            await self._insert_key(tx, replacement, label, now, expires_at=None)
            deadline = grace_deadline(current, old_expires_at)
            if deadline is not None and deadline != current:
                await tx.execute(
                    "UPDATE api_keys SET expires_at = ? WHERE id = ?", self._t(deadline), key_id
                )
            created, rotated = rotation_audit(label, key_id, replacement.id, deadline)
            await self._audit(tx, now, workspace_id, replacement.id, "key.create", actor, created)
            await self._audit(tx, now, workspace_id, key_id, "key.rotate", actor, rotated)
            await self._announce(tx, now, Change(ChangeKind.KEY, bytes(old["key_hash"]).hex()))
            await self._announce(tx, now, Change(ChangeKind.KEY, replacement.key_hash.hex()))
            return await self._key(tx, key_id), await self._key(tx, replacement.id)

        return await self._write(work)

    async def record_key_use(self, last_used: Mapping[str, datetime]) -> None:
        if not last_used:
            return
        # Sorted by key id: concurrent replicas lock rows in one order and cannot deadlock.
        params = [(self._t(at), key_id, self._t(at)) for key_id, at in sorted(last_used.items())]

        async def work(tx: Tx) -> None:
            await tx.executemany(
                "UPDATE api_keys SET last_used_at = ? WHERE id = ? "
                "AND (last_used_at IS NULL OR last_used_at < ?)",
                params,
            )

        await self._write(work, idempotent=True)

    async def _read_list(self, sql: str, *args: Any) -> list[Row]:
        # Lists and reports are for people and the CLI, not the request path: they may take
        # as long as a write, where a point lookup must answer within the read timeout.
        return await self._read(lambda tx: tx.fetch(sql, *args), seconds=self._write_timeout)

    def _workspace(self, row: Row, prefix: str = "") -> Workspace:
        return workspace_from_row(row, self._parse_time, prefix)

    def _maybe_time(self, value: Any) -> datetime | None:
        return None if value is None else self._parse_time(value)

    async def _key_limit(self, tx: Tx, workspace_id: str) -> int | None:
        # The row lock serializes key creates per workspace, so the limit holds under races.
        row = await tx.fetchrow(
            "SELECT key_limit FROM workspaces WHERE id = ?" + self.for_update, workspace_id
        )
        return None if row is None else int(row["key_limit"])

    async def _active_keys(self, tx: Tx, workspace_id: str, now: datetime) -> int:
        row = await tx.fetchrow(_ACTIVE_KEYS, workspace_id, self._t(now))
        assert row is not None
        return int(row["n"])

    async def _insert_key(
        self, tx: Tx, new: NewKey, label: str, now: datetime, *, expires_at: datetime | None
    ) -> None:
        await tx.execute(
            "INSERT INTO api_keys (id, workspace_id, label, key_hash, mask, created_at, "
            "expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            new.id,
            new.workspace_id,
            label,
            new.key_hash,
            new.mask,
            self._t(now),
            None if expires_at is None else self._t(expires_at),
        )

    async def _key(self, tx: Tx, key_id: str) -> ApiKey:
        row = await tx.fetchrow(f"SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?", key_id)
        assert row is not None
        return key_from_row(row, self._parse_time)

    async def _audit(
        self,
        tx: Tx,
        now: datetime,
        workspace_id: str,
        key_id: str | None,
        action: str,
        actor: Actor,
        detail: str,
    ) -> None:
        await tx.execute(
            f"INSERT INTO audit_log ({AUDIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            self._t(now),
            workspace_id,
            key_id,
            action,
            actor.kind,
            actor.subject,
            actor.issuer,
            actor.address,
            detail,
        )
