"""A `RedisRateLimiter` on a test clock: the tests' way to make the Lua scripts' time exact.

Production scripts read the Redis server's TIME. Here each script is built with a clock that
reads "now" (epoch ms) from its last ARGV, and every call appends `clock_ms()` there, so the
Python twin and the Lua scripts can be stepped through the same instants.
"""

from __future__ import annotations

from collections.abc import Callable
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
