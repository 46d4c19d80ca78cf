"""Every report counted exactly once, eventually: the ledger is tallied before the counters,
and a failed counter update is retried with the same operation id."""

from __future__ import annotations

from authz.usage.events import parse_entry
from ratelimit.limiter import Limits, Quota, QuotaState, RateLimitUnavailable
from ratelimit.memory import InMemoryRateLimiter
from tests.support.fakes import FakeStore, workspace
from tests.unit.test_usage import ALLOW, accountant, entry

QUOTA = Quota(period="2026-11", token_quota=1_000_000, spend_cap_micros=None)


class LostReplies(InMemoryRateLimiter):
    """Runs `record_usage`, then loses the reply `lose` times, as a Redis timeout does."""

    def __init__(self) -> None:
        super().__init__(clock_ms=lambda: 0)
        self.lose = 0
        self.ids: list[object] = []

    async def record_usage(self, *args: object, **kwargs: object) -> QuotaState:
        self.ids.append(kwargs.get("operation_id"))
        state = await super().record_usage(*args, **kwargs)  # type: ignore[arg-type]
        if self.lose:
            self.lose -= 1
            raise RateLimitUnavailable("reply lost")
        return state


async def used(limiter: InMemoryRateLimiter) -> int:
    result = await limiter.acquire("ws_test", Limits(rpm=0, tpm=0), 0, quota=QUOTA)
    assert result.quota is not None
    return result.quota.tokens_used


async def test_a_lost_reply_is_retried_with_the_same_id_and_counts_once() -> None:
    store = FakeStore()
    store.workspaces["ws_test"] = workspace()
    limiter = LostReplies()
    await limiter.seed_usage("ws_test", period="2026-11", tokens=0, spend_micros=0)
    books = accountant(store, limiter)
    event = parse_entry(entry(ALLOW, {"prompt_tokens": 12, "completion_tokens": 5}))
    assert event is not None
    limiter.lose = 2
    await books.record(event)
    await books.flush()  # the retry loses its reply too
    await books.flush()
    assert await used(limiter) == 17
    assert len(limiter.ids) == 3
    assert len(set(limiter.ids)) == 1
    assert books._metrics.usage_counter_queue._value.get() == 0


async def test_a_failed_workspace_lookup_never_drops_the_ledger_row() -> None:
    store = FakeStore()
    store.workspaces["ws_test"] = workspace()
    limiter = InMemoryRateLimiter(clock_ms=lambda: 0)
    await limiter.seed_usage("ws_test", period="2026-11", tokens=0, spend_micros=0)
    books = accountant(store, limiter)
    event = parse_entry(entry(ALLOW, {"prompt_tokens": 400, "completion_tokens": 100}))
    assert event is not None
    store.down = True  # the workspace is not cached: its lookup fails
    await books.record(event)
    await books.flush()
    assert await used(limiter) == 0
    assert books._metrics.usage_counter_queue._value.get() == 1
    store.down = False
    await books.flush()
    rows = [r for batch in store.batches.values() for r in batch]
    assert [(r.requests, r.prompt_tokens, r.completion_tokens) for r in rows] == [(1, 400, 100)]
    assert await used(limiter) == 500
    await books.flush()
    assert await used(limiter) == 500
