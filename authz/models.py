"""Records the store hands out. Plain frozen data: no I/O, no secrets."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

DEFAULT_RPM = 60
DEFAULT_TPM = 100_000
DEFAULT_KEY_LIMIT = 10
DEFAULT_COMPLETION_TOKENS = 256
"""Tokens reserved for the completion when a request names no max_tokens (CONTRACT §3)."""


class Enforcement(StrEnum):
    """What a workspace does with a request its limits would refuse (CONTRACT §3)."""

    ENFORCE = "enforce"
    SHADOW = "shadow"
    """Evaluate and reserve as usual, but admit: a dry run for rolling limits out."""


class StreamingUsage(StrEnum):
    """What a workspace does with a stream that will not report its usage (no
    `stream_options.include_usage`): charge the reservation as an estimate, or refuse it (400)."""

    ESTIMATE = "estimate"
    REQUIRE = "require"


@dataclass(frozen=True, slots=True)
class Workspace:
    """A tenant: keys, limits, quotas and usage all hang off it."""

    id: str
    name: str
    rpm: int
    tpm: int
    key_limit: int
    default_completion_tokens: int
    monthly_token_quota: int | None
    monthly_spend_cap_usd: float | None
    created_at: datetime
    updated_at: datetime
    enforcement: Enforcement = Enforcement.ENFORCE
    streaming_usage: StreamingUsage = StreamingUsage.ESTIMATE


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A key as lists show it: never the secret, only its mask and public id."""

    id: str
    workspace_id: str
    label: str
    mask: str
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None
    expires_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True, slots=True)
class KeyGrant:
    """What the Check path needs to know about a live key; cached per key hash."""

    key_id: str
    workspace_id: str
    mask: str
    expires_at: datetime | None


@dataclass(frozen=True, slots=True)
class WorkspaceUpdate:
    """Fields to change on a workspace; None leaves a field alone."""

    name: str | None = None
    rpm: int | None = None
    tpm: int | None = None
    key_limit: int | None = None
    default_completion_tokens: int | None = None
    monthly_token_quota: int | None = None
    monthly_spend_cap_usd: float | None = None
    clear_quota: bool = False
    clear_spend_cap: bool = False
    enforcement: Enforcement | None = None
    streaming_usage: StreamingUsage | None = None


@dataclass(frozen=True, slots=True)
class NewWorkspace:
    """A workspace to create."""

    name: str
    rpm: int = DEFAULT_RPM
    tpm: int = DEFAULT_TPM
    key_limit: int = DEFAULT_KEY_LIMIT
    default_completion_tokens: int = DEFAULT_COMPLETION_TOKENS
    monthly_token_quota: int | None = None
    monthly_spend_cap_usd: float | None = None
    enforcement: Enforcement = Enforcement.ENFORCE
    streaming_usage: StreamingUsage = StreamingUsage.ESTIMATE


@dataclass(frozen=True, slots=True)
class NewKey:
    """A key to store: its hash and mask, never the secret itself."""

    id: str
    workspace_id: str
    label: str
    key_hash: bytes
    mask: str
    expires_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Actor:
    """Who did something, for the audit log: an operator at the CLI or a signed-in user."""

    kind: str
    subject: str
    issuer: str | None = None
    address: str | None = None


CLI_ACTOR = Actor(kind="operator", subject="cli")


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One line of the audit log: who did what to which key, when, from where."""

    at: datetime
    workspace_id: str
    key_id: str | None
    action: str
    actor_kind: str
    actor_subject: str
    actor_issuer: str | None
    actor_address: str | None
    detail: str


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One hour of traffic for one workspace, key and model: the billing ledger's grain."""

    hour: datetime
    workspace_id: str
    key_id: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    errors_4xx: int
    errors_5xx: int
    spend_usd: float
    estimated_requests: int = 0
    """Requests whose usage the upstream did not report, charged their reservation instead."""
    estimated_tokens: int = 0
    """Tokens charged by estimate for those requests; not in prompt/completion_tokens, which
    hold only what the upstream reported."""

    @property
    def tokens(self) -> int:
        """Every token charged: reported and estimated."""
        return self.prompt_tokens + self.completion_tokens + self.estimated_tokens


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """USD per million input and output tokens; model "*" is the default for unknown models."""

    model: str
    input_per_1m_usd: float
    output_per_1m_usd: float
    updated_at: datetime | None = None
