"""Latency buckets and denials per hour (authz/usage/observations.py), for every dialect.

Two small tables beside the ledger, written in idempotent batches like it, read for one
workspace and a range of hours by the console's Observability page.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from authz.store.base import utc_now
from authz.store.dialect import Tx
from authz.store.sql_keys import KeyRules
from authz.usage.observed import DenialRow, LatencyRow


class ObservationRules(KeyRules):
    """The observation half of the Store protocol."""

    async def apply_observation_batch(
        self, batch_id: str, latency: Sequence[LatencyRow], denials: Sequence[DenialRow]
    ) -> bool:
        # One row order for every writer, so concurrent replicas take locks alike.
        latency_values = [
            (self._t(r.hour), r.workspace_id, r.key_id, r.bucket, r.count)
            for r in sorted(latency, key=lambda r: (r.workspace_id, r.hour, r.key_id, r.bucket))
        ]
        denial_values = [
            (self._t(r.hour), r.workspace_id, r.key_id, r.reason, r.count)
            for r in sorted(denials, key=lambda r: (r.workspace_id, r.hour, r.key_id, r.reason))
        ]

        async def work(tx: Tx) -> bool:
            inserted = await tx.execute(
                "INSERT INTO observation_batches (batch_id, applied_at) VALUES (?, ?) "
                "ON CONFLICT (batch_id) DO NOTHING",
                batch_id,
                self._t(utc_now()),
            )
            if not inserted:
                return False
            if latency_values:
                await tx.executemany(
                    "INSERT INTO latency_hourly (hour, workspace_id, key_id, bucket, requests) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (workspace_id, hour, key_id, bucket) "
                    "DO UPDATE SET requests = latency_hourly.requests + excluded.requests",
                    latency_values,
                )
            if denial_values:
                await tx.executemany(
                    "INSERT INTO denials_hourly (hour, workspace_id, key_id, reason, requests) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (workspace_id, hour, key_id, reason) "
                    "DO UPDATE SET requests = denials_hourly.requests + excluded.requests",
                    denial_values,
                )
            return True

        # The batch id makes a rerun after a dropped connection count once.
        return await self._write(work, idempotent=True)

    async def latency_report(
        self, workspace_id: str, since: datetime, until: datetime
    ) -> list[LatencyRow]:
        rows = await self._read_list(
            "SELECT hour, workspace_id, key_id, bucket, requests FROM latency_hourly "
            "WHERE workspace_id = ? AND hour >= ? AND hour < ? ORDER BY hour, key_id, bucket",
            workspace_id,
            self._t(since),
            self._t(until),
        )
        return [
            LatencyRow(
                self._parse_time(r["hour"]),
                r["workspace_id"],
                r["key_id"],
                int(r["bucket"]),
                int(r["requests"]),
            )
            for r in rows
        ]

    async def denial_report(
        self, workspace_id: str, since: datetime, until: datetime
    ) -> list[DenialRow]:
        rows = await self._read_list(
            "SELECT hour, workspace_id, key_id, reason, requests FROM denials_hourly "
            "WHERE workspace_id = ? AND hour >= ? AND hour < ? ORDER BY hour, key_id, reason",
            workspace_id,
            self._t(since),
            self._t(until),
        )
        return [
            DenialRow(
                self._parse_time(r["hour"]),
                r["workspace_id"],
                r["key_id"],
                r["reason"],
                int(r["requests"]),
            )
            for r in rows
        ]
