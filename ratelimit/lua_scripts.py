"""The Redis scripts, one per operation, shipped as package data under `ratelimit/lua/`.

A script's text is `clock.lua` (the `now_ms` function: Redis' TIME) + `prelude.lua` (the shared
bucket and counter maths) + for the ledger-mark operations `ledger.lua` (see `ratelimit.marks`)
+ the operation's body, which documents its KEYS and ARGV.

`one_key_form` puts `keys_from_argv.lua` in front of a script: the form a Redis Cluster call
takes after an ASK redirect (see ratelimit/redis_cluster.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from importlib import resources


class Operation(StrEnum):
    """One script per operation; the value names its body file and the latency label."""

    ACQUIRE = "acquire"
    ACQUIRE_QUOTA = "acquire_quota"
    ADJUST = "adjust"
    RECORD = "record"
    SEED = "seed"
    RECORD_MONTH = "record_month"
    FOLD = "fold"
    SEED_BEGIN = "seed_begin"
    SEED_FINISH = "seed_finish"


LEDGER_OPERATIONS = frozenset(
    {Operation.RECORD_MONTH, Operation.FOLD, Operation.SEED_BEGIN, Operation.SEED_FINISH}
)
"""The operations on a month's ledger marks: their scripts also get `ledger.lua`."""


def read_lua(name: str) -> str:
    """One file of `ratelimit/lua/`, e.g. "prelude"."""
    lua = resources.files("ratelimit").joinpath("lua")
    return lua.joinpath(f"{name}.lua").read_text(encoding="utf-8")


def script_text(operation: Operation, *, clock: str | None = None) -> str:
    """The full script of `operation`. `clock` replaces `clock.lua` (tests pass a fixed clock)."""
    parts = (
        read_lua("clock") if clock is None else clock,
        read_lua("prelude"),
        *((read_lua("ledger"),) if operation in LEDGER_OPERATIONS else ()),
        read_lua(operation),
    )
    return "\n".join(parts)


def one_key_form(text: str) -> str:
    """`text` (a full script) taking only its first key in KEYS, the others first in ARGV after
    their count: `EVALSHA sha 1 key1 n-1 key2..keyN args...`."""
    return read_lua("keys_from_argv") + "\n" + text


def one_key_args(keys: Sequence[str], args: Sequence[object]) -> list[object]:
    """The EVALSHA arguments after `numkeys` for `one_key_form`: key1, the count of the other
    keys, the other keys, then the script's own ARGV."""
    return [keys[0], len(keys) - 1, *keys[1:], *args]
