"""Records → tokenfactory.keys.v1 messages. Pure: the servicer passes `now` in."""

from __future__ import annotations

from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from authz.api.gen import keys_pb2
from authz.models import ApiKey, UsageRow, Workspace


def timestamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def is_live(key: ApiKey, now: datetime) -> bool:
    """Neither revoked nor past its grace deadline: the Check path would accept it."""
    return key.revoked_at is None and (key.expires_at is None or key.expires_at > now)


def key_message(key: ApiKey, *, now: datetime) -> keys_pb2.Key:
    """A key as the API shows it: mask and public id, never the secret."""
    message = keys_pb2.Key(
        id=key.id,
        workspace_id=key.workspace_id,
        label=key.label,
        mask=key.mask,
        created_at=timestamp(key.created_at),
        active=is_live(key, now),
    )
    if key.revoked_at is not None:
        message.revoked_at.CopyFrom(timestamp(key.revoked_at))
    if key.last_used_at is not None:
        message.last_used_at.CopyFrom(timestamp(key.last_used_at))
    if key.expires_at is not None:
        message.expires_at.CopyFrom(timestamp(key.expires_at))
    return message


def workspace_message(workspace: Workspace, *, active_keys: int) -> keys_pb2.Workspace:
    message = keys_pb2.Workspace(
        id=workspace.id,
        name=workspace.name,
        rpm=workspace.rpm,
        tpm=workspace.tpm,
        key_limit=workspace.key_limit,
        default_completion_tokens=workspace.default_completion_tokens,
        active_keys=active_keys,
        created_at=timestamp(workspace.created_at),
        updated_at=timestamp(workspace.updated_at),
        enforcement=workspace.enforcement.value,
    )
    if workspace.monthly_token_quota is not None:
        message.monthly_token_quota = workspace.monthly_token_quota
    if workspace.monthly_spend_cap_usd is not None:
        message.monthly_spend_cap_usd = workspace.monthly_spend_cap_usd
    return message


def usage_message(row: UsageRow) -> keys_pb2.UsageRow:
    return keys_pb2.UsageRow(
        hour=timestamp(row.hour),
        key_id=row.key_id,
        model=row.model,
        requests=row.requests,
        prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens,
        errors_4xx=row.errors_4xx,
        errors_5xx=row.errors_5xx,
        spend_usd=row.spend_usd,
    )
