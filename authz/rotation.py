"""Key rotation, the one rule the key API's RotateKey and `authz key rotate` both run.

A replacement is minted in the old key's workspace; the old key keeps working until a grace
deadline, or until someone revokes it. The store does the rest atomically (the key limit, the
audit rows, telling every replica), so both front ends behave the same at the limit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from authz.keys import mint_key
from authz.models import Actor, ApiKey
from authz.store.base import Store
from authz.store.common import MAX_LABEL_LENGTH, InvalidInput

MAX_GRACE = timedelta(days=30)
"""Longest a rotated key may keep working on a deadline; longer overlaps should revoke by hand."""

_ROTATED_SUFFIX = re.compile(r" \(rotated \d{4}-\d{2}-\d{2}\)$")


@dataclass(frozen=True, slots=True)
class Rotation:
    """The old key (with its deadline, if any), its replacement, and the replacement's secret."""

    previous: ApiKey
    replacement: ApiKey
    secret: str


def rotation_label(old_label: str, day: datetime) -> str:
    """`<workload> (rotated YYYY-MM-DD)`: the workload is the old label minus an earlier suffix."""
    suffix = f" (rotated {day:%Y-%m-%d})"
    workload = _ROTATED_SUFFIX.sub("", old_label)
    return workload[: MAX_LABEL_LENGTH - len(suffix)].rstrip() + suffix


def grace_deadline(grace: timedelta | None, now: datetime, *, name: str) -> datetime | None:
    """When the old key stops working; None keeps it until revoked. `name` is the caller's
    spelling of the setting (`grace_period`, `--grace`), for the error message."""
    if grace is None:
        return None
    if not timedelta(0) < grace <= MAX_GRACE:
        raise InvalidInput(f"{name} must be more than 0 s and at most {MAX_GRACE.days} days")
    return now + grace


async def rotate_key(
    store: Store,
    old: ApiKey,
    *,
    label: str | None,
    deadline: datetime | None,
    actor: Actor,
    now: datetime,
) -> Rotation:
    """Mint and store `old`'s replacement; raises the store's KeyLimitReached, Conflict, ..."""
    secret, new = mint_key(old.workspace_id, label or rotation_label(old.label, now))
    previous, replacement = await store.rotate_key(
        old.id, new, actor=actor, old_expires_at=deadline
    )
    return Rotation(previous=previous, replacement=replacement, secret=secret)
