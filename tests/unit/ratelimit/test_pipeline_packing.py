"""The pipeliner's own RESP packing writes exactly the bytes redis-py's would."""

from __future__ import annotations

import pytest
from redis.asyncio.connection import Connection
from redis.exceptions import DataError

from ratelimit.pipeline import pack_evalsha

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.parametrize(
    ("keys", "args"),
    [
        ((), ()),
        (("rl:{ws_1}:req", "rl:{ws_1}:tok"), (60, 0, 500, -3, 10**18)),
        (("é{ws}",), ("x y", "", 7, "2026-11")),
    ],
)
def test_evalsha_bytes_match_redis_py(keys: tuple[str, ...], args: tuple[int | str, ...]) -> None:
    expected = b"".join(Connection().pack_commands([("EVALSHA", SHA, len(keys), *keys, *args)]))
    assert pack_evalsha(SHA, keys, args) == expected


def test_a_bool_argument_is_refused_as_redis_py_refuses_it() -> None:
    with pytest.raises(DataError):
        pack_evalsha(SHA, ("k",), (True,))
    with pytest.raises(DataError):
        Connection().pack_commands([("EVALSHA", SHA, 1, "k", True)])
