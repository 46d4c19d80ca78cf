"""A reply lost after the script ran: the retried call must not count twice.

A proxy drops Redis' answer to one call and closes that connection; the limiter retries the
call on a fresh connection, and the script answers the repeat from its operation key.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from ratelimit.limiter import Limits, Quota, QuotaState
from ratelimit.redis_backend import RedisRateLimiter, connect_redis
from tests.integration.ratelimit.conftest import GENEROUS_TIMEOUT_SECONDS
from tests.support.drop_proxy import ReplyDroppingProxy
from tests.support.redis_servers import RedisServer

pytestmark = pytest.mark.integration

PERIOD = "2025-03"
LIMITS = Limits(rpm=0, tpm=1000)
UNLIMITED = Quota(period=PERIOD, token_quota=None, spend_cap_micros=None)


@pytest.fixture
async def proxy(own_redis: RedisServer) -> AsyncIterator[ReplyDroppingProxy]:
    proxy = ReplyDroppingProxy(own_redis.port)
    await proxy.start()
    yield proxy
    await proxy.close()


@pytest.fixture
async def limiter(proxy: ReplyDroppingProxy) -> AsyncIterator[RedisRateLimiter]:
    client = connect_redis(proxy.url, timeout_seconds=GENEROUS_TIMEOUT_SECONDS)
    limiter = RedisRateLimiter(client, timeout_seconds=GENEROUS_TIMEOUT_SECONDS)
    # Load every script first, so the dropped reply is the script's, not a NOSCRIPT error.
    await limiter.acquire("warm-up", LIMITS, 1, quota=UNLIMITED)
    await limiter.adjust_tokens("warm-up", LIMITS, -1)
    await limiter.record_usage(
        "warm-up", LIMITS, period=PERIOD, tpm_delta=0, tokens=0, spend_micros=0
    )
    yield limiter
    await limiter.close()


async def usage(limiter: RedisRateLimiter, workspace: str) -> tuple[QuotaState | None, int]:
    """The period's counters and the tokens left in the bucket, read without debiting."""
    result = await limiter.acquire(workspace, LIMITS, 0, quota=UNLIMITED)
    return result.quota, result.tokens.remaining


async def test_a_lost_record_reply_counts_once(
    limiter: RedisRateLimiter, proxy: ReplyDroppingProxy
) -> None:
    assert (await limiter.acquire("ws", LIMITS, 100)).allowed
    proxy.drop_next_reply()
    state = await limiter.record_usage(
        "ws", LIMITS, period=PERIOD, tpm_delta=-50, tokens=100, spend_micros=250
    )
    assert proxy.dropped == 1  # the first reply was lost, so the call was retried
    assert state == QuotaState(PERIOD, 100, 250, known=False)
    assert await usage(limiter, "ws") == (QuotaState(PERIOD, 100, 250, known=True), 950)


async def test_a_lost_refund_reply_refunds_once(
    limiter: RedisRateLimiter, proxy: ReplyDroppingProxy
) -> None:
    assert (await limiter.acquire("ws", LIMITS, 600)).allowed
    proxy.drop_next_reply()
    await limiter.adjust_tokens("ws", LIMITS, -200)
    assert proxy.dropped == 1
    assert (await usage(limiter, "ws"))[1] == 600


async def test_each_call_counts_even_with_equal_arguments(limiter: RedisRateLimiter) -> None:
    for _ in range(2):
        await limiter.record_usage(
            "ws", LIMITS, period=PERIOD, tpm_delta=0, tokens=10, spend_micros=1
        )
    assert (await usage(limiter, "ws"))[0] == QuotaState(PERIOD, 20, 2, known=True)
