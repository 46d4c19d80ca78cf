"""Logic both stores share: validation of writes and applying a workspace update."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from typing import Any

from authz.keys import key_like_in
from authz.models import ModelPrice, NewWorkspace, UsageRow, Workspace, WorkspaceUpdate

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


USAGE_COLUMNS = (
    "hour, workspace_id, key_id, model, requests, prompt_tokens, completion_tokens, "
    "errors_4xx, errors_5xx, spend_usd"
)

_ADDED_UP = (
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "errors_4xx",
    "errors_5xx",
    "spend_usd",
)
USAGE_UPSERT = "ON CONFLICT (hour, workspace_id, key_id, model) DO UPDATE SET " + ", ".join(
    f"{column} = usage_hourly.{column} + excluded.{column}" for column in _ADDED_UP
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
    )


def usage_filters(
    *,
    workspace_id: str | None,
    key_id: str | None,
    since: datetime | None,
    until: datetime | None,
    encode_time: Callable[[datetime], Any],
    placeholder: Callable[[int], str],
) -> tuple[str, list[Any]]:
    """The WHERE clause (or "") and its parameters for a ledger report; `placeholder(n)` names
    the n-th parameter in the dialect (`?` or `$n`)."""
    clauses: list[str] = []
    params: list[Any] = []
    for column, op, value in (
        ("workspace_id", "=", workspace_id),
        ("key_id", "=", key_id),
        ("hour", ">=", None if since is None else encode_time(since)),
        ("hour", "<", None if until is None else encode_time(until)),
    ):
        if value is not None:
            params.append(value)
            clauses.append(f"{column} {op} {placeholder(len(params))}")
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params
