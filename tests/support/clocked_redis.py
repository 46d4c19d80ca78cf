"""A `RedisRateLimiter` on a test clock: the tests' way to make the Lua scripts' time exact.

Production scripts read the Redis server's TIME. Here each script is built with a clock that
reads "now" (epoch ms) from its last ARGV, and every call appends `clock_ms()` there, so the
Python twin and the Lua scripts can be stepped through the same instants.

Redis still expires keys on its own (real) clock, so a test clock that jumps days ahead leaves
keys alive that production, where the scripts' clock *is* Redis' clock, would have lost.
`AgingClockedRedisRateLimiter` closes that gap for tests that jump further than a key's TTL.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ratelimit.lua_scripts import Operation, script_text
from ratelimit.redis_backend import RedisClient, RedisRateLimiter

TEST_CLOCK_LUA = """-- FOR TESTS ONLY: "now" is the last argument of every call.
local function now_ms()
  return tonumber(ARGV[#ARGV])
end
"""


class ClockedRedisRateLimiter(RedisRateLimiter):
    """`RedisRateLimiter` whose scripts take their clock from `clock_ms` (epoch milliseconds)."""

    def __init__(self, client: RedisClient, *, clock_ms: Callable[[], int], **kwargs: Any) -> None:
        self._clock_ms = clock_ms
        super().__init__(client, **kwargs)

    def _script_text(self, operation: Operation) -> str:
        return script_text(operation, clock=TEST_CLOCK_LUA)

    def _clock_args(self) -> list[int]:
        return [self._clock_ms()]


class AgingClockedRedisRateLimiter(ClockedRedisRateLimiter):
    """A `ClockedRedisRateLimiter` whose keys also age on the test clock (standalone Redis).

    Before each script call, the time the test clock moved since the last call is taken off
    the TTL of every key of the called workspace (its hash tag), and a key whose TTL runs out
    is deleted, as Redis would have expired it had that time really passed. Without it the
    month counters (40 days) outlive a test jump of a year on Redis and not in the in-process
    twin, a disagreement production cannot have.
    """

    def __init__(self, client: RedisClient, *, clock_ms: Callable[[], int], **kwargs: Any) -> None:
        super().__init__(client, clock_ms=clock_ms, **kwargs)
        self._aged_to_ms = clock_ms()

    async def _run(
        self, operation: Operation, keys: Sequence[str], args: Sequence[int | str]
    ) -> Any:
        now = self._clock_ms()
        elapsed, self._aged_to_ms = now - self._aged_to_ms, max(now, self._aged_to_ms)
        if elapsed > 0:
            await self._age(keys[0], elapsed)
        return await super()._run(operation, keys, args)

    async def _age(self, key: str, elapsed_ms: int) -> None:
        # Every key of a workspace starts with the prefix up to its hash tag (ratelimit.keys).
        prefix = key[: key.index("}") + 1]
        async for name in self._client.scan_iter(match=prefix + ":*"):
            left = await self._client.pttl(name)
            if left < 0:  # no expiry (-1) or gone meanwhile (-2)
                continue
            if left <= elapsed_ms:
                await self._client.delete(name)
            else:
                await self._client.pexpire(name, left - elapsed_ms)
