"""The ledger's batch marks (ratelimit/marks.py), for every dialect.

A batch raises its replica's mark for each workspace and period it touches, in its own
transaction; a snapshot reads a period's totals and its marks in one statement, which both
databases answer from one consistent view. Together they tell which batches a snapshot holds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from authz.models import UsageRow
from authz.store.base import LedgerMark, LedgerSnapshot
from authz.store.dialect import Tx
from authz.usage.periods import period_bounds, period_of


def months_of(rows: Sequence[UsageRow]) -> list[tuple[str, str]]:
    """The (workspace, period) pairs the rows touch, sorted: one lock order for every writer."""
    return sorted({(row.workspace_id, period_of(row.hour)) for row in rows})


async def raise_marks(tx: Tx, rows: Sequence[UsageRow], mark: LedgerMark) -> None:
    """Raise the replica's mark of each month the rows touch (never lower it)."""
    await tx.executemany(
        "INSERT INTO usage_ledger_marks (workspace_id, period, replica_id, position) "
        "VALUES (?, ?, ?, ?) ON CONFLICT (workspace_id, period, replica_id) DO UPDATE SET "
        "position = excluded.position WHERE usage_ledger_marks.position < excluded.position",
        [(ws, period, mark.replica_id, mark.position) for ws, period in months_of(rows)],
    )


SNAPSHOT = (
    "SELECT 'total' AS kind, '' AS replica_id, "
    "coalesce(sum(prompt_tokens + completion_tokens + estimated_tokens), 0) AS tokens, "
    "coalesce(sum(spend_usd), 0) AS spend, 0 AS position FROM usage_hourly "
    "WHERE workspace_id = ? AND hour >= ? AND hour < ? "
    "UNION ALL "
    "SELECT 'mark', replica_id, 0, 0, position FROM usage_ledger_marks "
    "WHERE workspace_id = ? AND period = ?"
)
"""One statement, so the totals and the marks come from one view of the database."""


async def read_snapshot(
    tx: Tx, workspace_id: str, period: str, encode_time: Callable[[datetime], Any]
) -> LedgerSnapshot:
    """The period's totals and marks (see `SNAPSHOT`)."""
    start, end = period_bounds(period)
    rows = await tx.fetch(
        SNAPSHOT, workspace_id, encode_time(start), encode_time(end), workspace_id, period
    )
    tokens, spend = 0, 0.0
    marks: dict[str, int] = {}
    for row in rows:
        if row["kind"] == "total":
            tokens, spend = int(row["tokens"]), float(row["spend"])
        else:
            marks[str(row["replica_id"])] = int(row["position"])
    return LedgerSnapshot(tokens=tokens, spend_usd=spend, marks=marks)
