"""Ledger rows and observations → what the Observability page draws. Pure: the caller
passes the range in.

The ledger's grain is one hour per workspace, key and model; the page wants one point per
hour for the workspace, totals per key (is the old key still used?), and the month so far
against the quota and spend cap.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from authz.api.gen import console_pb2, keys_pb2
from authz.usage.observed import DENIAL_REASONS

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


def _latency(latency: console_pb2.Latency) -> dict[str, Any]:
    return {"p50_ms": latency.p50_ms, "p95_ms": latency.p95_ms}


def _denials(denials: Mapping[str, int]) -> dict[str, int]:
    return {reason: int(denials.get(reason, 0)) for reason in DENIAL_REASONS}


def observed(
    points: list[dict[str, Any]],
    keys: dict[str, dict[str, Any]],
    answer: console_pb2.GetObservationsResponse,
) -> dict[str, Any]:
    """Add p50/p95 (ms) and denials by reason to the hourly points and the per-key totals (a
    key with only denials gets an entry too), and return the range's totals."""
    by_hour = {h.hour.ToDatetime(tzinfo=UTC).isoformat(): h for h in answer.hours}
    empty = console_pb2.HourObservation()
    for point in points:
        hour = by_hour.get(point["hour"], empty)
        point.update(_latency(hour.latency), **_denials(hour.denials))
    for key in answer.keys:
        entry = keys.setdefault(
            key.key_id, {**dict.fromkeys(COUNTERS, 0), "spend_usd": 0.0, "last_hour": None}
        )
        entry.update(_latency(key.latency), denials=_denials(key.denials))
    for entry in keys.values():
        entry.setdefault("p50_ms", 0.0)
        entry.setdefault("p95_ms", 0.0)
        entry.setdefault("denials", _denials({}))
    totals = {reason: sum(p[reason] for p in points) for reason in DENIAL_REASONS}
    return {"latency": _latency(answer.total), "denials": totals}
