"""Implicit pipelining: the script calls made in one event-loop tick go out as one write.

Under load many Checks reach the limiter in the same tick. One by one, each pays redis-py's
connection checkout, its own write and its own read; coalesced, the tick's calls share one
connection, one write and one read of all replies (as envoyproxy/ratelimit pipelines its
Redis calls). Each call stays one EVALSHA of its own script, answered separately: a script's
error reply fails only its caller, and the bucket maths are untouched (every script is atomic
on its own; a pipeline is not a transaction and needs none).

NOSCRIPT (after SCRIPT FLUSH or a Redis restart): the calls that met it are sent again, once
each script has been loaded with SCRIPT LOAD, in the same guarded call, as redis-py's own
EVALSHA fallback does.

Standalone Redis only: on Redis Cluster each call goes to the node of its slot, so the limiter
calls scripts one by one there (see redis_backend).

A caller that stops waiting (its deadline passed, its Check was cancelled) leaves the batch
without disturbing the others: the batch runs in its own task.

The batch is written and read on a pooled connection directly (pack, one write, one read per
reply) rather than through redis-py's Pipeline object: per batch that object costs a retry
wrapper, observability hooks and a command stack, which measured through Envoy was a larger
share of a Check's CPU than the EVALSHA's own write and read. Up to two connections stay
checked out between batches (the pool's checkout and release were a sixth of a call's CPU).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

_KEEP_IDLE = 2
"""Batches in flight at once are few (one per loop tick, each a round trip), so two kept
connections serve nearly all of them; the rest of the pool stays for everyone else."""
_EVALSHA = b"$7\r\nEVALSHA\r\n"


def _bulk(value: str | int) -> bytes:
    """One RESP bulk string, encoded as redis-py's Encoder does (str as UTF-8, int by repr)."""
    if isinstance(value, bool):
        # redis-py refuses bools rather than guess 0/1 or "True"; so do we.
        raise DataError("Invalid input of type: 'bool'. Convert to a bytes, string, int or float.")
    data = value.encode() if isinstance(value, str) else repr(value).encode()
    return b"$%d\r\n%b\r\n" % (len(data), data)


def pack_evalsha(sha: str, keys: Sequence[str], args: Sequence[int | str]) -> bytes:
    """`EVALSHA sha numkeys key... arg...` in RESP, byte for byte what redis-py's
    `pack_command` writes for it, at a fraction of its cost (it was a fifth of a Redis call's
    CPU: a generic encoder, command-name splitting and a buffer cut-off per argument)."""
    parts = [b"*%d\r\n" % (3 + len(keys) + len(args)), _EVALSHA, _bulk(sha), _bulk(len(keys))]
    parts += map(_bulk, keys)
    parts += map(_bulk, args)
    return b"".join(parts)


async def _write(connection: Any, data: bytes) -> None:
    """What `send_packed_command` does for a connected connection, without its per-write task:
    it runs every write under `asyncio.wait_for`, which wraps it in a task of its own (a task
    and an extra loop iteration per batch, most of the batch's CPU after the reads). A write
    only waits when the socket's buffer is full: that wait keeps the socket timeout. Failures
    raise what redis-py raises (the guard retries a ConnectionError once)."""
    writer = connection._writer
    try:
        writer.write(data)
        _, high = writer.transport.get_write_buffer_limits()
        if writer.transport.get_write_buffer_size() > high:
            async with asyncio.timeout(connection.socket_timeout):  # not wait_for (see Supervisor)
                await writer.drain()
        else:
            await writer.drain()  # returns at once; raises if the connection was lost
    except TimeoutError:
        raise RedisTimeoutError("Timeout writing to socket") from None
    except OSError as error:
        raise RedisConnectionError(f"Error while writing to socket: {error!r}") from error


@dataclass(slots=True)
class _Call:
    script: AsyncScript
    keys: Sequence[str]
    args: Sequence[int | str]
    future: asyncio.Future[Any]


class ScriptPipeliner:
    """Coalesces concurrent `evalsha` calls into one pipelined round trip per loop tick."""

    def __init__(self, client: Redis) -> None:
        self._client = client
        self._pending: list[_Call] = []
        self._batches: set[asyncio.Task[None]] = set()
        self._idle: list[Any] = []
        """Connections kept checked out between batches (at most _KEEP_IDLE): the pool's
        checkout and release cost a sixth of a call's CPU."""

    async def evalsha(
        self, script: AsyncScript, keys: Sequence[str], args: Sequence[int | str]
    ) -> Any:
        """The script's reply; raises what redis-py raises for the call or for its batch."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append(_Call(script, keys, args, future))
        return await future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.ensure_future(self._send(batch))
        self._batches.add(task)
        task.add_done_callback(self._batches.discard)

    async def _send(self, batch: list[_Call]) -> None:
        live = [call for call in batch if not call.future.done()]
        if not live:
            return
        try:
            replies = await self._execute(live)
        except asyncio.CancelledError:
            for call in live:
                call.future.cancel()
            raise
        except Exception as error:  # each caller's guard translates and counts it
            for call in live:
                if not call.future.done():
                    call.future.set_exception(error)
            return
        for call, reply in zip(live, replies, strict=True):
            if call.future.done():
                continue
            if isinstance(reply, Exception):
                call.future.set_exception(reply)
            else:
                call.future.set_result(reply)

    async def _execute(self, calls: Sequence[_Call]) -> list[Any]:
        replies = await self._pipeline(calls)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            for script in {id(calls[i].script): calls[i].script for i in missing}.values():
                await self._client.script_load(script.script)
            again = await self._pipeline([calls[i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    async def _pipeline(self, calls: Sequence[_Call]) -> list[Any]:
        """One write of every EVALSHA, then each reply in order; an error reply is returned
        in its place (as a non-raising pipeline does), a connection failure raises."""
        pool = self._client.connection_pool
        connection = await self._checkout()
        try:
            await _write(
                connection, b"".join([pack_evalsha(c.script.sha, c.keys, c.args) for c in calls])
            )
            replies: list[Any] = []
            for _ in calls:
                try:
                    replies.append(await connection.read_response())
                except ResponseError as error:
                    replies.append(error)
        except BaseException:
            # Failed or cancelled between the write and the last reply: replies may still be
            # on the way, so the socket cannot serve the next batch. The kept ones may have
            # met the same fault (a restart): back to the pool, whose checkout checks them.
            await connection.disconnect(nowait=True)
            await pool.release(connection)
            await self._release_idle()
            raise
        # Kept only while the pool could still hand out a connection: when it cannot, someone
        # may be waiting for one (a ping, a replay check), and this release wakes them.
        if len(self._idle) < _KEEP_IDLE and pool.can_get_connection():
            self._idle.append(connection)
        else:
            await pool.release(connection)
        return replies

    async def _checkout(self) -> Any:
        """A kept connection that passes the pool's own check, else one from the pool.

        The pool's checkout checks the connection (reconnecting a dead one), as a pipeline's
        does: a Redis restart fails no batch that finds it back up. A kept one gets the same
        check without the pool's lock: one the server closed (a restart) or that holds
        unread data goes back to the pool, and the next is tried."""
        pool = self._client.connection_pool
        while self._idle:
            kept = self._idle.pop()
            try:
                if kept.is_connected and not await kept.can_read():
                    return kept
            except RedisConnectionError:
                pass  # can_read disconnected it
            await kept.disconnect(nowait=True)
            await pool.release(kept)
        return await pool.get_connection()  # type: ignore[no-untyped-call]

    async def _release_idle(self) -> None:
        """Every kept connection back to the pool."""
        idle, self._idle = self._idle, []
        for connection in idle:
            await self._client.connection_pool.release(connection)

    async def close(self) -> None:
        """Wait for the batches in flight (their callers have answers coming), then give the
        kept connections back to the pool (the client's close disconnects the pool's)."""
        await asyncio.gather(*self._batches, return_exceptions=True)
        await self._release_idle()
