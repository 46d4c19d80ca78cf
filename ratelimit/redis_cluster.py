"""Script calls on Redis Cluster: routed by the limiter, redirects and slot migration handled here.

Each call is one EVALSHA on the pooled connections of the master that owns its slot in redis-py's
slot map (`ClusterNode`), rather than through `RedisCluster.execute_command`, whose redirect
handling (redis-py 8.1) fails under load: it sends ASKING and the command on two separately
pooled connections, and it closes the whole client on every fifth MOVED. How each answer is met:

* MOVED: the slot has a new owner (a migration finished, a replica took over). The slot map is
  patched from the redirect (as redis-py does) and the call goes there.
* ASK: the slot is migrating and the source holds none of the call's keys. ASKING and the
  EVALSHA go in one write on one connection of the target (docs/redis-cluster.md has the
  upstream reproduction). There the call takes its one-key form (`lua_scripts.one_key_form`):
  after ASKING, a node runs a script naming several keys only when they all exist, and a call
  may be the one that creates them (a workspace's first call). The outcome stays exact: the
  source held none of the keys, and a migration only moves keys from the source to the target.
* TRYAGAIN: the slot is migrating and the source holds some of the call's keys, not all. The
  migration has moved the others already, or they must be created and a migrating source
  creates none. It ends when the migration moves the rest, so the call is retried every
  TRYAGAIN_PAUSE_SECONDS until `tryagain_seconds` after its start (a share of the Redis
  budget: the last retry's answer is due before the budget ends), then fails.
* NOSCRIPT: SCRIPT LOAD on that node, then the call again.
* A connection error or timeout: the slot map is re-read in the background (the node may have
  failed over); calls to the other masters never wait for that read, and keep their connections
  through it (`_keep_connections`).

Scripts name only the keys they touch (`keys.touched_bucket_keys`), and a workspace's keys are
kept as long as each other (`bucket.KEEP_MS`, the operations hash of `keys.operations_key`), so
an active workspace, whose keys all exist, is served throughout a slot migration: by the source
until the migration moves its keys, then by the target, every bucket debited exactly once.

Also here: `parse_cluster_url`, the seeds and credentials of a `redis+cluster://` URL (the URL
forms are described in ratelimit/redis_backend.py).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any
from urllib.parse import unquote

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, NodesManager, PipelineCommand, RedisCluster
from redis.exceptions import (
    AskError,
    MovedError,
    NoScriptError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ratelimit.lua_scripts import one_key_args, one_key_form

TRYAGAIN_PAUSE_SECONDS = 0.005
"""Between retries of a call that met TRYAGAIN: a MIGRATE step takes about a millisecond."""

TRYAGAIN_SHARE = 0.8
"""Of the Redis budget, the share a call may spend waiting out TRYAGAIN: it then fails on its
own (a migration, which charges no breaker) before the guard's deadline (a timeout, which does)."""

MAX_REDIRECTS = 5
"""MOVED and ASK answers one call follows before it gives up (a settled slot needs at most 2)."""


@dataclass(frozen=True, slots=True)
class ClusterScript:
    """One script in both forms: as called on the slot's owner, and in its one-key form, with
    their SHA1s (a node loads each on its first NOSCRIPT)."""

    text: str
    sha: str
    one_key_text: str
    one_key_sha: str

    @classmethod
    def of(cls, text: str) -> ClusterScript:
        one_key_text = one_key_form(text)
        return cls(text, _sha1(text), one_key_text, _sha1(one_key_text))


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8"), usedforsecurity=False).hexdigest()


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a shared task's exception as seen: its waiters report it, if any are left."""
    if not task.cancelled():
        task.exception()


def _keep_connections(manager: NodesManager) -> None:
    """Undo the reconnect marks a slot-map read leaves on the connections of the nodes it kept.

    redis-py 8.1 marks every connection of every node it keeps for reconnect on each read, to
    drop a replica's READONLY state; these calls never send READONLY. Re-reads follow each failed
    call to a dead master, so every one would make each healthy master's next calls connect
    anew (a connect and a handshake: three round trips in the 50 ms budget, for all of a
    node's calls at once), and under CPU load enough of them timed out to open its breaker.
    """
    for node in chain(manager.nodes_cache.values(), manager.startup_nodes.values()):
        for connection in node._connections:
            connection.reset_should_reconnect()  # type: ignore[no-untyped-call]  # untyped in 8.1


async def _asking(node: ClusterNode, args: Sequence[Any]) -> Any:
    """ASKING and the command in one write on one connection of `node` (redis-py 8.1 sends them
    on two pooled connections: docs/redis-cluster.md); the command's reply, or its error."""
    commands = [PipelineCommand(0, "ASKING"), PipelineCommand(1, *args)]
    await node.execute_pipeline(commands)
    reply = commands[1].result
    if isinstance(reply, BaseException):
        raise reply
    return reply


class ClusterScripts:
    """Runs script calls on the node that owns their slot, following redirects itself."""

    def __init__(self, cluster: RedisCluster, *, tryagain_seconds: float) -> None:
        self._cluster = cluster
        self._tryagain = tryagain_seconds
        self._refresh: asyncio.Future[None] | None = None

    def owner(self, key: str) -> str | None:
        """The name of the master that owns `key`'s slot in the current map, if any."""
        node = self._owner(self._cluster.keyslot(key))
        return node.name if node is not None else None

    @property
    def has_slot_map(self) -> bool:
        """Whether a slot map was read. A stale one is refreshed on the errors it causes, never
        before a call: calls to healthy masters must not wait on a re-read."""
        return bool(self._cluster.nodes_manager.slots_cache)

    async def refresh(self) -> None:
        """(Re)read the slot map in one shared task that no caller's timeout can cancel.

        redis-py's own `initialize()`, cancelled or failed, closes every node's connections and
        fails the calls in flight on healthy masters too; shielded, a read runs to its end.
        """
        await asyncio.shield(self._start_refresh())

    def refresh_soon(self) -> None:
        """Re-read the slot map in the background."""
        self._start_refresh()

    def _start_refresh(self) -> asyncio.Future[None]:
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.ensure_future(self._read_slot_map())
            self._refresh.add_done_callback(_retrieve)
        return self._refresh

    async def _read_slot_map(self) -> None:
        cluster = self._cluster
        if getattr(cluster, "_initialize", True) or not cluster.nodes_manager.slots_cache:
            await cluster.initialize()
        else:
            # Only the map: unlike `initialize()`, a failure here closes no connection.
            await cluster.nodes_manager.initialize()
            _keep_connections(cluster.nodes_manager)

    async def evalsha(self, script: ClusterScript, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """The script's reply from the node that owns the slot of `keys` (one slot)."""

        async def on_owner(node: ClusterNode) -> Any:
            argv = [len(keys), *keys, *args]
            try:
                return await node.execute_command("EVALSHA", script.sha, *argv)
            except NoScriptError:
                await node.execute_command("SCRIPT", "LOAD", script.text)
                return await node.execute_command("EVALSHA", script.sha, *argv)

        async def asked(node: ClusterNode) -> Any:
            argv = ["EVALSHA", script.one_key_sha, 1, *one_key_args(keys, args)]
            try:
                return await _asking(node, argv)
            except NoScriptError:
                await node.execute_command("SCRIPT", "LOAD", script.one_key_text)
                return await _asking(node, argv)

        return await self._routed(keys[0], on_owner, asked)

    async def command(self, key: str, *args: Any) -> Any:
        """A single-key command (`args` in full), routed like the scripts."""

        async def on_owner(node: ClusterNode) -> Any:
            return await node.execute_command(*args)

        async def asked(node: ClusterNode) -> Any:
            return await _asking(node, args)

        return await self._routed(key, on_owner, asked)

    async def _routed(
        self,
        key: str,
        on_owner: Callable[[ClusterNode], Awaitable[Any]],
        asked: Callable[[ClusterNode], Awaitable[Any]],
    ) -> Any:
        """`on_owner(node)` on the owner of `key`'s slot, following MOVED, ASK (`asked(node)`)
        and TRYAGAIN as the module docstring says."""
        slot = self._cluster.keyslot(key)
        loop = asyncio.get_running_loop()
        # The TRYAGAIN share runs from the call's start, as the Redis budget does.
        tryagain_until = loop.time() + self._tryagain
        redirects = 0
        node = await self._owner_or_refresh(slot)
        while True:
            try:
                return await on_owner(node)
            except MovedError as moved:
                redirects = self._redirected(redirects, moved)
                await self._cluster.nodes_manager.move_slot(moved)
                node = await self._owner_or_refresh(slot)
            except AskError as ask:
                redirects = self._redirected(redirects, ask)
                try:
                    return await asked(await self._node(ask))
                except MovedError as moved:  # the migration finished meanwhile
                    redirects = self._redirected(redirects, moved)
                    await self._cluster.nodes_manager.move_slot(moved)
                    node = await self._owner_or_refresh(slot)
            except TryAgainError:
                # No pause ends past the share: the last retry's round trip then fits in the
                # rest of the budget, and a migration that outlasts the share fails the call as
                # a migration (no breaker charged), not as a timeout of the node.
                if loop.time() + TRYAGAIN_PAUSE_SECONDS > tryagain_until:
                    raise
                await asyncio.sleep(TRYAGAIN_PAUSE_SECONDS)
            except (RedisConnectionError, RedisTimeoutError, OSError):
                self.refresh_soon()
                raise

    def _owner(self, slot: int) -> ClusterNode | None:
        owners = self._cluster.nodes_manager.slots_cache.get(slot)
        return owners[0] if owners else None

    async def _owner_or_refresh(self, slot: int) -> ClusterNode:
        node = self._owner(slot)
        if node is None:
            await self.refresh()
            node = self._owner(slot)
        if node is None:
            raise SlotNotCoveredError(f"slot {slot} has no master in the cluster's slot map")
        return node

    async def _node(self, redirect: AskError) -> ClusterNode:
        """The node an ASK names (a node new to the slot map is added, as for MOVED)."""
        manager = self._cluster.nodes_manager
        node = manager.get_node(host=redirect.host, port=redirect.port)
        if node is None:
            node = ClusterNode(redirect.host, redirect.port, **manager.connection_kwargs)
            manager.set_nodes(manager.nodes_cache, {node.name: node})
        return node

    @staticmethod
    def _redirected(redirects: int, error: AskError) -> int:
        """Count one more redirect; past MAX_REDIRECTS the last one is the call's error."""
        if redirects >= MAX_REDIRECTS:
            raise error
        return redirects + 1


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], str | None, str | None]:
    """Split a `redis+cluster://` URL into seed (host, port) pairs, username and password."""
    rest = url.partition("://")[2]
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    netloc, tail = rest[:cut], rest[cut:]
    if tail not in ("", "/", "/0"):
        raise ValueError(f"a Redis Cluster URL takes no path or options, got {tail!r}")
    userinfo, at, hostlist = netloc.rpartition("@")
    username: str | None = None
    password: str | None = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    seeds = [_parse_host_port(item) for item in hostlist.split(",") if item]
    if not seeds:
        raise ValueError("a Redis Cluster URL needs at least one host:port")
    return seeds, username, password


def _parse_host_port(item: str) -> tuple[str, int]:
    if item.startswith("["):
        host, bracket, port_text = item[1:].partition("]")
        if not bracket or not port_text.startswith(":"):
            raise ValueError(f"bad cluster node {item!r}: expected [ipv6]:port")
        port_text = port_text[1:]
    else:
        host, colon, port_text = item.rpartition(":")
        if not colon:
            raise ValueError(f"bad cluster node {item!r}: expected host:port")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad cluster node {item!r}: expected host:port")
    return host, int(port_text)


class ClusterCommands:
    """The plain commands sent beside the limiter on its cluster client, routed like its scripts
    (redis-py's own routing fails under a slot migration): the access-log replay check's SET."""

    def __init__(self, cluster: RedisCluster) -> None:
        self._routes = ClusterScripts(cluster, tryagain_seconds=0.0)

    async def set(
        self, name: str, value: bytes, *, nx: bool = False, ex: int | None = None
    ) -> bool:
        """SET `name` (NX: only if absent; EX: with a TTL); whether it was set."""
        args: list[Any] = ["SET", name, value, *(["NX"] if nx else [])]
        if ex is not None:
            args += ["EX", ex]
        return bool(await self._routes.command(name, *args))


def shared_commands(client: Redis | RedisCluster) -> Redis | ClusterCommands:
    """What other parts should send plain commands through: the client itself on a standalone
    Redis, `ClusterCommands` on a cluster."""
    return ClusterCommands(client) if isinstance(client, RedisCluster) else client
