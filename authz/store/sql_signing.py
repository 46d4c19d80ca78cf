"""Reservation-signing keys in the SQL store: created by `migrate`, rotated with an overlap.

Kept in the database so that every replica signs and verifies with the same secrets, with no
setting to distribute. Written once for every dialect.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta

from authz.store.base import SigningKey, utc_now
from authz.store.dialect import Dialect, Tx
from authz.store.rows import Row

SECRET_BYTES = 32
_COLUMNS = "id, secret_hex, created_at, retires_at"


def new_signing_key(now: datetime) -> SigningKey:
    """A fresh random key (the fake store makes its keys here too)."""
    return SigningKey(secrets.token_hex(4), secrets.token_bytes(SECRET_BYTES), now, None)


def retire_at(current: datetime | None, now: datetime, overlap: timedelta) -> datetime:
    """When a rotated-out key stops verifying: `overlap` from now, never later than before."""
    deadline = now + overlap
    return deadline if current is None else min(current, deadline)


class SigningKeyRules(Dialect):
    """The signing-key half of the Store protocol."""

    async def _ensure_signing_key(self, tx: Tx) -> None:
        """Called by `migrate`, inside its transaction: the first key, once."""
        row = await tx.fetchrow("SELECT count(*) AS n FROM signing_keys WHERE retires_at IS NULL")
        if row is None or not row["n"]:
            await self._insert_signing_key(tx, new_signing_key(utc_now()))

    async def _insert_signing_key(self, tx: Tx, key: SigningKey) -> None:
        await tx.execute(
            f"INSERT INTO signing_keys ({_COLUMNS}) VALUES (?, ?, ?, NULL)",
            key.id,
            key.secret.hex(),
            self._t(key.created_at),
        )

    def _signing_key(self, row: Row) -> SigningKey:
        retires = row["retires_at"]
        return SigningKey(
            id=row["id"],
            secret=bytes.fromhex(row["secret_hex"]),
            created_at=self._parse_time(row["created_at"]),
            retires_at=None if retires is None else self._parse_time(retires),
        )

    async def signing_keys(self) -> list[SigningKey]:
        now = utc_now()
        # Read in the background and at start-up, never on a Check: the longer write timeout.
        rows = await self._read(
            lambda tx: tx.fetch(
                f"SELECT {_COLUMNS} FROM signing_keys WHERE retires_at IS NULL OR retires_at > ?",
                self._t(now),
            ),
            seconds=self._write_timeout,
        )
        keys = [self._signing_key(row) for row in rows]
        # The current key (no retirement) first, then the newest.
        keys.sort(key=lambda k: (k.retires_at is not None, -k.created_at.timestamp()))
        return keys

    async def rotate_signing_key(self, *, overlap: timedelta) -> SigningKey:
        now = utc_now()
        key = new_signing_key(now)

        async def work(tx: Tx) -> None:
            rows = await tx.fetch(
                f"SELECT {_COLUMNS} FROM signing_keys WHERE retires_at IS NULL OR retires_at > ?"
                + self.for_update,
                self._t(now),
            )
            for old in (self._signing_key(row) for row in rows):
                await tx.execute(
                    "UPDATE signing_keys SET retires_at = ? WHERE id = ?",
                    self._t(retire_at(old.retires_at, now, overlap)),
                    old.id,
                )
            await self._insert_signing_key(tx, key)

        await self._write(work)
        return key
