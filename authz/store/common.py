"""Logic both stores share: validation of writes and applying a workspace update."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from authz.keys import key_like_in
from authz.models import ModelPrice, NewWorkspace, UsageRow, Workspace, WorkspaceUpdate
from authz.store.base import Conflict, KeyLimitReached

MAX_NAME_LENGTH = 128
MAX_LABEL_LENGTH = 128
MAX_LIMIT = 2**31 - 1


class InvalidInput(ValueError):
    """A write with a bad value; the message says which and why."""


def check_name(name: str, what: str = "workspace name") -> str:
    cleaned = name.strip()
    if not cleaned:
        raise InvalidInput(f"{what} must not be empty")
    if len(cleaned) > MAX_NAME_LENGTH:
        raise InvalidInput(f"{what} must be at most {MAX_NAME_LENGTH} characters")
    if any(not ch.isprintable() for ch in cleaned):
        raise InvalidInput(f"{what} must not contain control characters")
    if key_like_in(cleaned) is not None:
        raise InvalidInput(f"{what} must not contain an API key")
    return cleaned


def check_label(label: str) -> str:
    """Labels show up in lists and logs: printable, short, no look-alike of a secret."""
    return check_name(label, "label")


def _check_count(field: str, value: int | None) -> None:
    if value is not None and not 0 <= value <= MAX_LIMIT:
        raise InvalidInput(f"{field} must be between 0 and {MAX_LIMIT}")


def check_new_workspace(new: NewWorkspace) -> NewWorkspace:
    for field in ("rpm", "tpm", "key_limit", "default_completion_tokens"):
        _check_count(field, getattr(new, field))
    _check_quota(new.monthly_token_quota, new.monthly_spend_cap_usd)
    return replace(new, name=check_name(new.name))


def _check_quota(quota: int | None, cap: float | None) -> None:
    if quota is not None and quota < 0:
        raise InvalidInput("monthly_token_quota must not be negative")
    if cap is not None and not 0 <= cap < 1e12:
        raise InvalidInput("monthly_spend_cap_usd must be between 0 and 1e12")


def apply_update(current: Workspace, update: WorkspaceUpdate, *, updated_at: datetime) -> Workspace:
    """The workspace after `update`, validated."""
    for field in ("rpm", "tpm", "key_limit", "default_completion_tokens"):
        _check_count(field, getattr(update, field))
    _check_quota(update.monthly_token_quota, update.monthly_spend_cap_usd)
    quota = current.monthly_token_quota
    if update.clear_quota:
        quota = None
    elif update.monthly_token_quota is not None:
        quota = update.monthly_token_quota
    cap = current.monthly_spend_cap_usd
    if update.clear_spend_cap:
        cap = None
    elif update.monthly_spend_cap_usd is not None:
        cap = update.monthly_spend_cap_usd
    return replace(
        current,
        name=check_name(update.name) if update.name is not None else current.name,
        rpm=current.rpm if update.rpm is None else update.rpm,
        tpm=current.tpm if update.tpm is None else update.tpm,
        key_limit=current.key_limit if update.key_limit is None else update.key_limit,
        default_completion_tokens=(
            current.default_completion_tokens
            if update.default_completion_tokens is None
            else update.default_completion_tokens
        ),
        monthly_token_quota=quota,
        monthly_spend_cap_usd=cap,
        enforcement=current.enforcement if update.enforcement is None else update.enforcement,
        streaming_usage=update.streaming_usage or current.streaming_usage,
        updated_at=updated_at,
    )


def check_price(price: ModelPrice) -> ModelPrice:
    """Prices are finite and non-negative; the model name is printable and short."""
    model = check_name(price.model, "model")
    for field in ("input_per_1m_usd", "output_per_1m_usd"):
        value = getattr(price, field)
        if not math.isfinite(value) or not 0 <= value < 1e9:
            raise InvalidInput(f"{field} must be a price in USD between 0 and 1e9")
    return replace(price, model=model)


def check_key_limit(active: int, limit: int, *, replacing: bool = False) -> None:
    """A new key must fit under the limit; the key a rotation replaces does not count, so a
    workspace at its limit can rotate, yet is never more than one key over it."""
    if active - (1 if replacing else 0) >= limit:
        raise KeyLimitReached()


def is_live(revoked_at: datetime | None, expires_at: datetime | None, now: datetime) -> bool:
    """Neither revoked nor past its deadline: counts against the key limit."""
    return revoked_at is None and (expires_at is None or expires_at > now)


def check_grace(old_expires_at: datetime | None, now: datetime) -> None:
    if old_expires_at is not None and old_expires_at <= now:
        raise InvalidInput("the grace deadline must be in the future")


def check_rotatable(
    key_id: str, revoked_at: datetime | None, deadline: datetime | None, now: datetime
) -> None:
    if not is_live(revoked_at, deadline, now):
        raise Conflict(f"key {key_id} is no longer active: create a new key instead")


def grace_deadline(current: datetime | None, requested: datetime | None) -> datetime | None:
    """The old key's deadline after a rotation: the requested one, never later than its own."""
    if requested is not None and (current is None or requested < current):
        return requested
    return current


def rotation_audit(
    label: str, key_id: str, replacement_id: str, deadline: datetime | None
) -> tuple[str, str]:
    """Audit details of a rotation: (for the new key's create, for the old key's rotate)."""
    until = (
        "until revoked"
        if deadline is None
        else f"until {deadline.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}"
    )
    return f"{label} (replaces {key_id})", f"replaced by {replacement_id}; valid {until}"


_WORKSPACE_FIELDS = (
    "name",
    "rpm",
    "tpm",
    "key_limit",
    "default_completion_tokens",
    "monthly_token_quota",
    "monthly_spend_cap_usd",
    "enforcement",
    "streaming_usage",
)
_PRICE_FIELDS = ("input_per_1m_usd", "output_per_1m_usd")


def _shown(value: object) -> str:
    return "none" if value is None else str(value)


def _changes(old: object | None, new: object, names: tuple[str, ...]) -> str:
    parts = [
        f"{name} {_shown(before)} \u2192 {_shown(after)}"
        for name in names
        if (before := getattr(old, name, None)) != (after := getattr(new, name))
    ]
    return ", ".join(parts) or "no change"


def workspace_change(old: Workspace, new: Workspace) -> str:
    """The audit detail of a workspace update: each changed field, e.g. `rpm 5 → 100`."""
    return _changes(old, new, _WORKSPACE_FIELDS)


def price_change(old: ModelPrice | None, new: ModelPrice) -> str:
    """The audit detail of a price change, e.g. `gpt-4o: input_per_1m_usd 2.5 → 2.0`."""
    return f"{new.model}: {_changes(old, new, _PRICE_FIELDS)}"


USAGE_COLUMNS = (
    "hour, workspace_id, key_id, model, requests, prompt_tokens, completion_tokens, "
    "errors_4xx, errors_5xx, spend_usd, estimated_requests, estimated_tokens"
)

LEDGER_SUMS = (
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "errors_4xx",
    "errors_5xx",
    "spend_usd",
    "estimated_requests",
    "estimated_tokens",
)
"""The ledger columns a flush adds to an hour's row (the others name the row)."""
USAGE_UPSERT = "ON CONFLICT (hour, workspace_id, key_id, model) DO UPDATE SET " + ", ".join(
    f"{column} = usage_hourly.{column} + excluded.{column}" for column in LEDGER_SUMS
)
"""A flush adds to the hour's row; both dialects accept this upsert."""


def usage_values(row: UsageRow, encode_time: Callable[[datetime], Any]) -> tuple[Any, ...]:
    """A ledger row's values in USAGE_COLUMNS order."""
    return (
        encode_time(row.hour),
        row.workspace_id,
        row.key_id,
        row.model,
        row.requests,
        row.prompt_tokens,
        row.completion_tokens,
        row.errors_4xx,
        row.errors_5xx,
        row.spend_usd,
        row.estimated_requests,
        row.estimated_tokens,
    )


def usage_filters(
    *,
    workspace_id: str | None,
    key_id: str | None,
    since: Any,
    until: Any,
) -> tuple[str, list[Any]]:
    """The WHERE clause (or "") and its parameters for a ledger report (times encoded)."""
    clauses: list[str] = []
    params: list[Any] = []
    for column, op, value in (
        ("workspace_id", "=", workspace_id),
        ("key_id", "=", key_id),
        ("hour", ">=", since),
        ("hour", "<", until),
    ):
        if value is not None:
            params.append(value)
            clauses.append(f"{column} {op} ?")
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params
