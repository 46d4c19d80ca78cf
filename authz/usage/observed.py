"""What the Observability page reads besides the ledger: latency buckets and denials per hour.

Rows of two small tables beside the ledger (usage_hourly): one count per hour, workspace,
key and latency bucket (authz/usage/latency.py), and one per hour, workspace, key and denial
reason. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

UNAUTHENTICATED = "unauthenticated"
RATE_LIMIT_REQUESTS = "rate_limit_requests"
RATE_LIMIT_TOKENS = "rate_limit_tokens"
INSUFFICIENT_QUOTA = "insufficient_quota"
DENIAL_REASONS = (UNAUTHENTICATED, RATE_LIMIT_REQUESTS, RATE_LIMIT_TOKENS, INSUFFICIENT_QUOTA)
"""401, 429 on requests per minute, 429 on tokens per minute, 429 on the monthly quota/cap."""


@dataclass(frozen=True, slots=True)
class LatencyRow:
    hour: datetime
    workspace_id: str
    key_id: str
    bucket: int
    count: int


@dataclass(frozen=True, slots=True)
class DenialRow:
    hour: datetime
    workspace_id: str
    key_id: str
    reason: str
    count: int


def denial_reason(status: int, code: str | None, kind: str | None) -> str | None:
    """The page's reason for one of our denials (status, OpenAI code and type), else None."""
    if status == 401:
        return UNAUTHENTICATED
    if code == "insufficient_quota":
        return INSUFFICIENT_QUOTA
    if code == "rate_limit_exceeded":
        return RATE_LIMIT_REQUESTS if kind == "requests" else RATE_LIMIT_TOKENS
    return None
