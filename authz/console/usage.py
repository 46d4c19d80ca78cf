"""Ledger rows → what the Observability page draws. Pure: the caller passes the range in.

The ledger's grain is one hour per workspace, key and model; the page wants one point per
hour for the workspace, totals per key (is the old key still used?), and the month so far
against the quota and spend cap.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from authz.api.gen import keys_pb2

RANGES = {"24h": timedelta(hours=24), "7d": timedelta(days=7)}
"""The page's ranges besides "month" (the current UTC calendar month)."""

COUNTERS = ("requests", "prompt_tokens", "completion_tokens", "errors_4xx", "errors_5xx")


@dataclass(frozen=True, slots=True)
class Window:
    since: datetime
    until: datetime


def window(name: str, now: datetime, month_start: datetime) -> Window:
    """[since, until) of a named range, whole hours, ending with the current hour."""
    until = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    if name == "month":
        return Window(month_start, until)
    return Window(until - RANGES[name], until)


def _hour(row: keys_pb2.UsageRow) -> datetime:
    return row.hour.ToDatetime(tzinfo=UTC)


def hourly(rows: Iterable[keys_pb2.UsageRow], span: Window) -> list[dict[str, Any]]:
    """One point per hour of the window (zeros where the ledger has nothing), oldest first."""
    points: dict[datetime, dict[str, Any]] = {}
    hour = span.since
    while hour < span.until:
        points[hour] = {"hour": hour.isoformat(), **dict.fromkeys(COUNTERS, 0), "spend_usd": 0.0}
        hour += timedelta(hours=1)
    for row in rows:
        point = points.get(_hour(row))
        if point is None:
            continue
        for name in COUNTERS:
            point[name] += getattr(row, name)
        point["spend_usd"] += row.spend_usd
    return list(points.values())


def per_key(rows: Iterable[keys_pb2.UsageRow]) -> dict[str, dict[str, Any]]:
    """Totals per key id, with the last hour it had traffic."""
    totals: dict[str, dict[str, Any]] = {}
    for row in rows:
        entry = totals.setdefault(
            row.key_id, {**dict.fromkeys(COUNTERS, 0), "spend_usd": 0.0, "last_hour": None}
        )
        for name in COUNTERS:
            entry[name] += getattr(row, name)
        entry["spend_usd"] += row.spend_usd
        last = _hour(row).isoformat()
        entry["last_hour"] = max(entry["last_hour"] or last, last)
    return totals


def month_totals(rows: Iterable[keys_pb2.UsageRow]) -> dict[str, Any]:
    tokens = 0
    spend = 0.0
    for row in rows:
        tokens += row.prompt_tokens + row.completion_tokens
        spend += row.spend_usd
    return {"tokens": tokens, "spend_usd": round(spend, 6)}
