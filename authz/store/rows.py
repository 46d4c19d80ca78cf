"""Row-to-record mapping shared by both stores; each store supplies its time parser."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, Protocol

from authz.models import (
    ApiKey,
    AuditEntry,
    Enforcement,
    KeyGrant,
    ModelPrice,
    StreamingUsage,
    UsageRow,
    Workspace,
)

WORKSPACE_COLUMNS = (
    "id, name, rpm, tpm, key_limit, default_completion_tokens, monthly_token_quota, "
    "monthly_spend_cap_usd, created_at, updated_at, enforcement, streaming_usage"
)
KEY_COLUMNS = "id, workspace_id, label, mask, created_at, revoked_at, last_used_at, expires_at"
AUDIT_COLUMNS = (
    "at, workspace_id, key_id, action, actor_kind, actor_subject, actor_issuer, actor_address, "
    "detail"
)


class Row(Protocol):
    """What both drivers' rows offer: sqlite3.Row and asyncpg.Record."""

    def __getitem__(self, key: str, /) -> Any: ...


TimeParser = Callable[[Any], datetime]


def _maybe(parse: TimeParser, value: Any) -> datetime | None:
    return None if value is None else parse(value)


def workspace_from_row(row: Row, parse: TimeParser, prefix: str = "") -> Workspace:
    cap = row[prefix + "monthly_spend_cap_usd"]
    return Workspace(
        id=row[prefix + "id"],
        name=row[prefix + "name"],
        rpm=row[prefix + "rpm"],
        tpm=row[prefix + "tpm"],
        key_limit=row[prefix + "key_limit"],
        default_completion_tokens=row[prefix + "default_completion_tokens"],
        monthly_token_quota=row[prefix + "monthly_token_quota"],
        monthly_spend_cap_usd=None if cap is None else float(cap),
        created_at=parse(row[prefix + "created_at"]),
        updated_at=parse(row[prefix + "updated_at"]),
        enforcement=Enforcement(row[prefix + "enforcement"]),
        streaming_usage=StreamingUsage(row[prefix + "streaming_usage"]),
    )


def key_from_row(row: Row, parse: TimeParser) -> ApiKey:
    return ApiKey(
        id=row["id"],
        workspace_id=row["workspace_id"],
        label=row["label"],
        mask=row["mask"],
        created_at=parse(row["created_at"]),
        revoked_at=_maybe(parse, row["revoked_at"]),
        last_used_at=_maybe(parse, row["last_used_at"]),
        expires_at=_maybe(parse, row["expires_at"]),
    )


def grant_from_row(row: Row, parse: TimeParser) -> KeyGrant:
    return KeyGrant(
        key_id=row["key_id"],
        workspace_id=row["key_workspace_id"],
        mask=row["key_mask"],
        expires_at=_maybe(parse, row["key_expires_at"]),
    )


def audit_from_row(row: Row, parse: TimeParser) -> AuditEntry:
    return AuditEntry(
        at=parse(row["at"]),
        workspace_id=row["workspace_id"],
        key_id=row["key_id"],
        action=row["action"],
        actor_kind=row["actor_kind"],
        actor_subject=row["actor_subject"],
        actor_issuer=row["actor_issuer"],
        actor_address=row["actor_address"],
        detail=row["detail"],
    )


LOOKUP_COLUMNS = (
    "k.id AS key_id, k.workspace_id AS key_workspace_id, k.mask AS key_mask, "
    "k.expires_at AS key_expires_at, "
    "w.id AS ws_id, w.name AS ws_name, w.rpm AS ws_rpm, w.tpm AS ws_tpm, "
    "w.key_limit AS ws_key_limit, w.default_completion_tokens AS ws_default_completion_tokens, "
    "w.monthly_token_quota AS ws_monthly_token_quota, "
    "w.monthly_spend_cap_usd AS ws_monthly_spend_cap_usd, "
    "w.created_at AS ws_created_at, w.updated_at AS ws_updated_at, "
    "w.enforcement AS ws_enforcement, w.streaming_usage AS ws_streaming_usage"
)


def usage_from_row(row: Row, parse: TimeParser) -> UsageRow:
    return UsageRow(
        hour=parse(row["hour"]),
        workspace_id=row["workspace_id"],
        key_id=row["key_id"],
        model=row["model"],
        requests=int(row["requests"]),
        prompt_tokens=int(row["prompt_tokens"]),
        completion_tokens=int(row["completion_tokens"]),
        errors_4xx=int(row["errors_4xx"]),
        errors_5xx=int(row["errors_5xx"]),
        spend_usd=float(row["spend_usd"]),
        estimated_requests=int(row["estimated_requests"]),
        estimated_tokens=int(row["estimated_tokens"]),
    )


def price_from_row(row: Row, parse: TimeParser) -> ModelPrice:
    return ModelPrice(
        model=row["model"],
        input_per_1m_usd=float(row["input_per_1m_usd"]),
        output_per_1m_usd=float(row["output_per_1m_usd"]),
        updated_at=parse(row["updated_at"]),
    )
