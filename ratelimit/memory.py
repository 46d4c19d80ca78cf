"""The in-process rate limiter: the embedded default when no Redis is configured.

Buckets and usage counters live in this process only, so it is correct for exactly one sidecar
process. It runs the same maths as the Redis script (`ratelimit.bucket`, `ratelimit.quota`), and
forgets what the Redis keys' TTLs would forget: buckets that are full again, and each usage
counter `COUNTER_TTL_SECONDS` after its last write (so never while its period is current).
Memory stays bounded by the workspaces active in the last couple of minutes (buckets) and in the
last ~40 days (two integers per workspace and period). A new process knows no counters: its
first quota check reports `known=False`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from ratelimit import bucket, marks
from ratelimit import quota as quotas
from ratelimit.limiter import LimitResult, Limits, Quota, QuotaKind, QuotaState, UsageTag

SWEEP_INTERVAL_MS = 1_000
"""How often (at most) forgotten buckets are swept; a sweep is O(buckets held)."""

COUNTER_SWEEP_INTERVAL_MS = 60_000
"""How often (at most) expired usage counters are swept; reads ignore expired ones anyway."""

_TOKENS = "qt"
_SPEND = "qs"


def monotonic_ms() -> int:
    """The default clock: whole milliseconds of `time.monotonic_ns`."""
    return time.monotonic_ns() // 1_000_000


@dataclass(slots=True)
class _Held:
    state: bucket.BucketLevel
    full_at_ms: int
    """From this moment the bucket is full, which is exactly what a forgotten bucket is."""


@dataclass(slots=True)
class _Counter:
    value: int
    expires_at_ms: int


@dataclass(slots=True)
class _Ledger:
    fields: dict[str, str]
    expires_at_ms: int


OPERATION_TTL_MS = 60_000
"""How long `record_usage` remembers an operation id (the Redis backend's OPERATION_TTL)."""


class InMemoryRateLimiter:
    """`RateLimiter` over per-process buckets; `clock_ms` returns monotonic milliseconds.

    Every method runs without awaiting, so each call is atomic on the event loop.
    """

    def __init__(self, *, clock_ms: Callable[[], int] = monotonic_ms) -> None:
        self._clock_ms = clock_ms
        self._buckets: dict[tuple[str, str], _Held] = {}
        # (workspace, period, "qt" or "qs"): one entry per Redis counter key, with its expiry.
        self._counters: dict[tuple[str, str, str], _Counter] = {}
        self._last_sweep_ms: int | None = None
        self._last_counter_sweep_ms: int | None = None
        # (workspace, operation id) → the first reply and when it is forgotten, as record.lua
        # keeps it in the workspace's operations hash.
        self._operations: dict[tuple[str, str], tuple[QuotaState, int]] = {}
        self._operations_swept_ms = 0
        # (workspace, period) → the month's ledger-mark hash (ratelimit.marks), with its expiry.
        self._ledgers: dict[tuple[str, str], _Ledger] = {}

    async def acquire(
        self,
        workspace_id: str,
        limits: Limits,
        tokens: int,
        *,
        quota: Quota | None = None,
        spend_micros: int = 0,
    ) -> LimitResult:
        """Check the quota (if given), then take one request and `tokens` tokens from both
        buckets or neither. The usage counters are only read."""
        limits = bucket.normalise_limits(limits)
        cost = bucket.normalise_cost(tokens)
        spend = quotas.normalise_amount(spend_micros, "spend")
        now = self._now()
        req_key, tok_key = (workspace_id, "req"), (workspace_id, "tok")
        requests, token_bucket = self._get(req_key), self._get(tok_key)
        if quota is None:
            outcome = bucket.acquire(
                limits, cost, now_ms=now, requests=requests, tokens=token_bucket
            )
        else:
            quota = quotas.normalise_quota(quota)
            outcome = quotas.acquire(
                limits,
                cost,
                now_ms=now,
                requests=requests,
                tokens=token_bucket,
                quota=quota,
                counters=self._read_counters(workspace_id, quota.period, now),
                usage_tokens=quotas.normalise_amount(tokens, "token cost"),
                usage_spend=spend,
            )
        if outcome.requests is not None:
            self._put(req_key, limits.rpm, outcome.requests)
        if outcome.tokens is not None:
            self._put(tok_key, limits.tpm, outcome.tokens)
        return outcome.decision.to_result()

    async def adjust_tokens(self, workspace_id: str, limits: Limits, delta: int) -> None:
        """Charge (delta > 0) or refund (delta < 0) tokens once the real usage is known."""
        self._adjust(workspace_id, bucket.normalise_limits(limits).tpm, delta, self._now())

    async def record_usage(
        self,
        workspace_id: str,
        limits: Limits,
        *,
        period: str,
        tpm_delta: int,
        tokens: int,
        spend_micros: int,
        operation_id: str | None = None,
        tag: UsageTag | None = None,
    ) -> QuotaState:
        """Adjust the TPM bucket by `tpm_delta` and add the usage to the period's counters, in
        one step. Returns the counters after it, `known` saying whether both existed before.
        Once per `operation_id`: a repeat within OPERATION_TTL_MS returns the first reply.
        With a `tag`, as record_month.lua (`ratelimit.marks.record`).
        """
        quotas.validate_period(period)
        tokens = quotas.normalise_amount(tokens, "tokens")
        spend = quotas.normalise_amount(spend_micros, "spend")
        now = self._now()
        if tag is not None:
            marks.check_replica(tag.replica_id)
        if operation_id is None:
            return self._record(workspace_id, limits, period, (tpm_delta, tokens, spend), now, tag)
        if now - self._operations_swept_ms >= 1000:  # amortised: at most once a second
            self._operations = {k: v for k, v in self._operations.items() if v[1] > now}
            self._operations_swept_ms = now
        done = self._operations.get((workspace_id, operation_id))
        if done is not None and done[1] > now:
            return done[0]
        state = self._record(workspace_id, limits, period, (tpm_delta, tokens, spend), now, tag)
        if state.known or tag is None:  # a tagged step that did nothing is not remembered
            self._operations[(workspace_id, operation_id)] = (state, now + OPERATION_TTL_MS)
        return state

    def _record(
        self,
        workspace_id: str,
        limits: Limits,
        period: str,
        amounts: tuple[int, int, int],
        now: int,
        tag: UsageTag | None = None,
    ) -> QuotaState:
        tpm_delta, tokens, spend = amounts
        if tag is not None:
            month_before = self._month(workspace_id, period, now)
            month, recorded = marks.record(
                month_before, tag.replica_id, tag.generation, tokens, spend
            )
            if recorded is marks.Recorded.MISSING:
                state = month_before.counters.state(period)
                return replace(state, known=False, missing=frozenset(QuotaKind))
            self._adjust(workspace_id, bucket.normalise_limits(limits).tpm, tpm_delta, now)
            counted = recorded is marks.Recorded.COUNTED
            self._put_month(workspace_id, period, month, now, counters=counted)
            return month.counters.state(period)
        self._adjust(workspace_id, bucket.normalise_limits(limits).tpm, tpm_delta, now)
        before = self._read_counters(workspace_id, period, now)
        after = quotas.record(before, tokens, spend)
        tokens_used, spend_used = after.tokens or 0, after.spend_micros or 0  # both exist now
        expires = now + quotas.COUNTER_TTL_MS
        self._counters[(workspace_id, period, _TOKENS)] = _Counter(tokens_used, expires)
        self._counters[(workspace_id, period, _SPEND)] = _Counter(spend_used, expires)
        return replace(after.state(period), known=before.known, missing=before.missing)

    async def seed_usage(
        self, workspace_id: str, *, period: str, tokens: int, spend_micros: int
    ) -> None:
        """Set each of the period's counters that is absent; an existing one is kept."""
        quotas.validate_period(period)
        tokens = quotas.normalise_amount(tokens, "tokens")
        spend = quotas.normalise_amount(spend_micros, "spend")
        now = self._now()
        before = self._read_counters(workspace_id, period, now)
        after = quotas.seed(before, tokens, spend)
        expires = now + quotas.COUNTER_TTL_MS
        for axis, old, new in (
            (_TOKENS, before.tokens, after.tokens),
            (_SPEND, before.spend_micros, after.spend_micros),
        ):
            if old is None and new is not None:
                self._counters[(workspace_id, period, axis)] = _Counter(new, expires)

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
        """As fold.lua (`ratelimit.marks.fold`)."""
        quotas.validate_period(period)
        tokens = quotas.normalise_amount(tokens, "tokens")
        spend = quotas.normalise_amount(spend_micros, "spend")
        now = self._now()
        marks.check_replica(replica_id)
        before = self._month(workspace_id, period, now)
        month, folded = marks.fold(before, replica_id, position, tokens, spend)
        if folded is marks.Folded.FOLDED:
            self._put_month(workspace_id, period, month, now, counters=True)
        elif folded is marks.Folded.HELD:
            self._put_month(workspace_id, period, month, now, counters=False, keep_expiry=True)
        return folded

    async def begin_seed(
        self, workspace_id: str, *, period: str, token: str, hold_ms: int
    ) -> marks.SeedStart:
        """As seed_begin.lua (`ratelimit.marks.seed_begin`)."""
        quotas.validate_period(period)
        now = self._now()
        before = self._month(workspace_id, period, now)
        month, start = marks.seed_begin(before, token)
        if month is not before:
            self._put_month(workspace_id, period, month, now, counters=True, ledger_ms=hold_ms)
        return start

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
        """As seed_finish.lua (`ratelimit.marks.seed_finish`)."""
        quotas.validate_period(period)
        now = self._now()
        before = self._month(workspace_id, period, now)
        month, done = marks.seed_finish(
            before,
            token,
            quotas.normalise_amount(tokens, "tokens"),
            quotas.normalise_amount(spend_micros, "spend"),
            snapshot_marks,
        )
        if done:
            self._put_month(workspace_id, period, month, now, counters=True)
        return done

    def _month(self, workspace_id: str, period: str, now: int) -> marks.Month:
        held = self._ledgers.get((workspace_id, period))
        ledger = None if held is None or held.expires_at_ms <= now else held.fields
        return marks.Month(self._read_counters(workspace_id, period, now), ledger)

    def _put_month(
        self,
        workspace_id: str,
        period: str,
        month: marks.Month,
        now: int,
        *,
        counters: bool,
        ledger_ms: int = quotas.COUNTER_TTL_MS,
        keep_expiry: bool = False,
    ) -> None:
        """Store a month as the scripts leave its keys: the hash (with a fresh expiry unless
        `keep_expiry`) and, with `counters`, both counters (absent ones deleted)."""
        key = (workspace_id, period)
        held = self._ledgers.get(key)
        if month.ledger is None:
            self._ledgers.pop(key, None)
        else:
            expires = held.expires_at_ms if keep_expiry and held else now + ledger_ms
            self._ledgers[key] = _Ledger(dict(month.ledger), expires)
        if not counters:
            return
        expires = now + quotas.COUNTER_TTL_MS
        values = ((_TOKENS, month.counters.tokens), (_SPEND, month.counters.spend_micros))
        for axis, value in values:
            if value is None:
                self._counters.pop((workspace_id, period, axis), None)
            else:
                self._counters[(workspace_id, period, axis)] = _Counter(value, expires)

    async def ping(self) -> bool:
        """Always ready: there is no backend to lose."""
        return True

    async def close(self) -> None:
        """Drop all buckets and counters."""
        self._buckets.clear()
        self._counters.clear()
        self._ledgers.clear()

    def __len__(self) -> int:
        """How many bucket states are held (for tests of the memory bound)."""
        return len(self._buckets)

    @property
    def counters_held(self) -> int:
        """How many usage counters are held, expired ones not yet swept included."""
        return len(self._counters)

    def _now(self) -> int:
        now = self._clock_ms()
        if self._last_sweep_ms is None or now - self._last_sweep_ms >= SWEEP_INTERVAL_MS:
            self._last_sweep_ms = now
            self._sweep(now)
        last = self._last_counter_sweep_ms
        if last is None or now - last >= COUNTER_SWEEP_INTERVAL_MS:
            self._last_counter_sweep_ms = now
            self._sweep_counters(now)
        return now

    def _adjust(self, workspace_id: str, tpm: int, delta: int, now: int) -> None:
        if not tpm or not delta:
            return
        key = (workspace_id, "tok")
        state = bucket.adjust(
            tpm, bucket.normalise_delta(delta, tpm), now_ms=now, tokens=self._get(key)
        )
        if state is not None:
            self._put(key, tpm, state)

    def _get(self, key: tuple[str, str]) -> bucket.BucketLevel | None:
        held = self._buckets.get(key)
        return None if held is None else held.state

    def _put(self, key: tuple[str, str], limit: int, state: bucket.BucketLevel) -> None:
        full_in = bucket.ms_to_reach(limit, state.level, bucket.capacity(limit))
        self._buckets[key] = _Held(state=state, full_at_ms=state.updated_ms + full_in)

    def _read_counters(self, workspace_id: str, period: str, now: int) -> quotas.Counters:
        return quotas.Counters(
            tokens=self._counter((workspace_id, period, _TOKENS), now),
            spend_micros=self._counter((workspace_id, period, _SPEND), now),
        )

    def _counter(self, key: tuple[str, str, str], now: int) -> int | None:
        held = self._counters.get(key)
        if held is None or held.expires_at_ms <= now:
            return None
        return held.value

    def _sweep(self, now: int) -> None:
        expired = [key for key, held in self._buckets.items() if held.full_at_ms <= now]
        for key in expired:
            del self._buckets[key]

    def _sweep_counters(self, now: int) -> None:
        expired = [key for key, held in self._counters.items() if held.expires_at_ms <= now]
        for key in expired:
            del self._counters[key]
        gone = [month for month, held in self._ledgers.items() if held.expires_at_ms <= now]
        for month in gone:
            del self._ledgers[month]
