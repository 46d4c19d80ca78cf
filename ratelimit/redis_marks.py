"""The Redis calls of the month counters' ledger marks (`ratelimit.marks`): one script each.

A mixin of `RedisRateLimiter`, which supplies `_run` (one script call, guarded and retried).
Every script here is safe to repeat: `record_month` through its operation id (remembered in the
workspace's operations hash, `keys.operations_key`), `fold` by position, `seed_begin` and
`seed_finish` by token.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from ratelimit import bucket, marks
from ratelimit import quota as quotas
from ratelimit.keys import bucket_keys, month_keys, operations_key
from ratelimit.limiter import Limits, QuotaState, UsageTag
from ratelimit.lua_scripts import Operation

OPERATION_TTL_SECONDS = 60
"""How long `adjust`, `record` and `record_month` remember an operation id: far past any retry
of the call."""


def operation_arg(operation_id: str | None) -> str:
    """The id a non-idempotent script (adjust, record, record_month) remembers its reply under,
    in the workspace's operations hash, so a retry is answered rather than applied again: the
    caller's, else a fresh one (which still covers the guard's own retry)."""
    return operation_id or uuid.uuid4().hex


class LedgerMarkCalls:
    """`fold_ledger`, `begin_seed`, `finish_seed` and tagged `record_usage` on Redis."""

    async def _run(
        self, operation: Operation, keys: Sequence[str], args: Sequence[int | str]
    ) -> Any:
        raise NotImplementedError

    async def _record_month(
        self,
        workspace_id: str,
        limits: Limits,
        period: str,
        amounts: tuple[int, int, int],
        operation_id: str | None,
        tag: UsageTag,
    ) -> QuotaState:
        tpm_delta, tokens, spend = amounts
        limits = bucket.normalise_limits(limits)
        tokens_key, spend_key, ledger_key = month_keys(workspace_id, period)
        delta = bucket.normalise_delta(tpm_delta, limits.tpm)
        # The token bucket is named only when the script touches it (keys.touched_bucket_keys).
        bucket_key = bucket_keys(workspace_id)[1] if limits.tpm and delta else tokens_key
        reply = await self._run(
            Operation.RECORD_MONTH,
            (bucket_key, tokens_key, spend_key, operations_key(workspace_id), ledger_key),
            [
                limits.tpm,
                delta,
                quotas.normalise_amount(tokens, "tokens"),
                quotas.normalise_amount(spend, "spend"),
                quotas.COUNTER_TTL_SECONDS,
                OPERATION_TTL_SECONDS,
                marks.check_replica(tag.replica_id),
                tag.generation,
                operation_arg(operation_id),
            ],
        )
        tokens_used, spend_used, recorded = (int(value) for value in reply)
        known = marks.Recorded(recorded) is not marks.Recorded.MISSING
        return quotas.state_from_wire(period, tokens_used, spend_used, 3 if known else 0)

    async def fold_ledger(
        self,
        workspace_id: str,
        *,
        period: str,
        replica_id: str,
        position: int,
        tokens: int,
        spend_micros: int,
    ) -> marks.Folded:
        """One `fold` script call; raises RateLimitUnavailable."""
        quotas.validate_period(period)
        reply = await self._run(
            Operation.FOLD,
            month_keys(workspace_id, period),
            [
                marks.check_replica(replica_id),
                position,
                quotas.normalise_amount(tokens, "tokens"),
                quotas.normalise_amount(spend_micros, "spend"),
                quotas.COUNTER_TTL_SECONDS,
            ],
        )
        return marks.Folded(int(reply))

    async def begin_seed(
        self, workspace_id: str, *, period: str, token: str, hold_ms: int
    ) -> marks.SeedStart:
        """One `seed_begin` script call; raises RateLimitUnavailable."""
        quotas.validate_period(period)
        reply = await self._run(
            Operation.SEED_BEGIN, month_keys(workspace_id, period), [token, hold_ms]
        )
        return marks.SeedStart(int(reply))

    async def finish_seed(
        self,
        workspace_id: str,
        *,
        period: str,
        token: str,
        tokens: int,
        spend_micros: int,
        snapshot_marks: Mapping[str, int],
    ) -> bool:
        """One `seed_finish` script call; raises RateLimitUnavailable."""
        quotas.validate_period(period)
        pairs: list[int | str] = []
        for replica, at in sorted(snapshot_marks.items()):
            pairs += [marks.check_replica(replica), at]
        reply = await self._run(
            Operation.SEED_FINISH,
            month_keys(workspace_id, period),
            [
                token,
                quotas.normalise_amount(tokens, "tokens"),
                quotas.normalise_amount(spend_micros, "spend"),
                quotas.COUNTER_TTL_SECONDS,
                *pairs,
            ],
        )
        return int(reply) == 1
