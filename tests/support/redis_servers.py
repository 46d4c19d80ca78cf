"""Redis for tests: a server named in the environment, or throwaway `redis-server` processes.

The rule: when `AUTHZ_TEST_REDIS_URL` is set, `redis_url_for_tests()` yields it and tests keep
out of each other's way with unique workspace ids; otherwise it starts a private `redis-server`
(no persistence, a temporary directory, a free 127.0.0.1 port) and kills it afterwards. Tests
that kill, restart or flush a server always start their own with `start_redis_server()`.

    with redis_url_for_tests() as url: ...
    server = start_redis_server(); server.kill(); server.start(); server.close()
    with redis_cluster(3) as cluster: cluster.url  # "redis+cluster://127.0.0.1:p1,..."

Servers are stopped by `close()` / the context managers, and, as a last resort, when the
interpreter exits.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.support.ports import machine_reservations
from tests.support.procs import ClosesOnExit

REDIS_URL_ENV = "AUTHZ_TEST_REDIS_URL"
REDIS_SERVER_ENV = "AUTHZ_TEST_REDIS_SERVER"
"""Optional path of the `redis-server` binary (default: found on PATH)."""

CLUSTER_SLOTS = 16384
_CLUSTER_BUS_OFFSET = 10000
_START_TIMEOUT_SECONDS = 10.0
_POLL_SECONDS = 0.01


def redis_server_binary() -> str:
    """The `redis-server` to run, or a clear error when there is none."""
    binary = os.environ.get(REDIS_SERVER_ENV) or shutil.which("redis-server")
    if not binary:
        raise RuntimeError(f"redis-server not found: install it or set {REDIS_SERVER_ENV}")
    return binary


def free_port(*, cluster_bus: bool = False) -> int:
    """A reserved 127.0.0.1 TCP port nothing listens on now (and its cluster bus port, if
    asked), as tests.support.procs.free_port()."""
    return machine_reservations().reserve((0, _CLUSTER_BUS_OFFSET) if cluster_bus else (0,))


def send_command(port: int, *args: str | int, timeout: float = 1.0) -> bytes:
    """Send one command to 127.0.0.1:port over RESP and return the raw reply.

    Deliberately minimal (no client library) so it works before a client could, e.g. while a
    cluster has no slots yet.
    """
    parts = [str(arg).encode() for arg in args]
    request = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        reply = b""
        while not _complete(reply):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
        return reply


def _complete(reply: bytes) -> bool:
    """Whether a simple, error, integer or bulk-string reply has fully arrived."""
    if not reply.endswith(b"\r\n"):
        return False
    if reply[:1] != b"$":
        return True
    header, _, body = reply.partition(b"\r\n")
    length = int(header[1:])
    return length < 0 or len(body) >= length + 2


class RedisServer(ClosesOnExit):
    """One `redis-server` process on 127.0.0.1 that a test owns: start, kill, restart, close."""

    def __init__(
        self,
        *,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        cluster: bool = False,
    ) -> None:
        self.port = port if port is not None else free_port(cluster_bus=cluster)
        self.host = "127.0.0.1"
        self._extra_args = list(extra_args)
        self._cluster = cluster
        self._dir = Path(tempfile.mkdtemp(prefix=f"redis-{self.port}-"))
        self._proc: subprocess.Popen[bytes] | None = None
        # Last resort: a server a test forgot to close dies with the interpreter.
        self._finalizer = weakref.finalize(self, _kill_and_remove, None, self._dir)

    @property
    def url(self) -> str:
        """`redis://127.0.0.1:<port>/0`."""
        return f"redis://{self.host}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        """The server's log file, for diagnosing a failed start."""
        return self._dir / "redis.log"

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the process (on the same port and directory as before) and wait for PONG."""
        if self.running:
            return
        argv = [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self._dir),
            "--logfile", str(self.log_path),
            "--daemonize", "no",
        ]  # fmt: skip
        if self._cluster:
            argv += [
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "5000",
            ]  # fmt: skip
        argv += self._extra_args
        self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _kill_and_remove, self._proc, self._dir)
        self._wait_until_ready()

    def kill(self) -> None:
        """SIGKILL the process: an abrupt crash, as a fault test wants it."""
        self._signal(signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP the process: it keeps its connections but answers nothing (a hung Redis)."""
        if self.running and self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT a paused process."""
        if self.running and self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Stop the process quickly (SIGKILL: there is no data worth saving; works when paused)."""
        self._signal(signal.SIGKILL)

    def restart(self) -> None:
        """Kill and start again on the same port: the data and loaded scripts are gone."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the process and delete its directory."""
        self.stop()
        self._finalizer()

    def _signal(self, sig: int) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(sig)
        self._proc.wait(timeout=_START_TIMEOUT_SECONDS)

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                break
            with contextlib.suppress(OSError):
                if send_command(self.port, "PING").startswith(b"+PONG"):
                    return
            time.sleep(_POLL_SECONDS)
        log = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not start:\n{log}")


def _kill_and_remove(proc: subprocess.Popen[bytes] | None, directory: Path) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()
    shutil.rmtree(directory, ignore_errors=True)


def start_redis_server(port: int | None = None, *, extra_args: Sequence[str] = ()) -> RedisServer:
    """Start a throwaway `redis-server` (a free port unless given); the caller must `close()` it."""
    server = RedisServer(port=port, extra_args=extra_args)
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    return server


@contextlib.contextmanager
def redis_server(
    port: int | None = None, *, extra_args: Sequence[str] = ()
) -> Iterator[RedisServer]:
    """`start_redis_server` as a context manager."""
    with start_redis_server(port, extra_args=extra_args) as server:
        yield server


@contextlib.contextmanager
def redis_url_for_tests() -> Iterator[str]:
    """`AUTHZ_TEST_REDIS_URL` when set, else the URL of a throwaway server for the block."""
    configured = os.environ.get(REDIS_URL_ENV)
    if configured:
        yield configured
        return
    with redis_server() as server:
        yield server.url


class RedisClusterServers(ClosesOnExit):
    """A Redis Cluster on 127.0.0.1: `masters` (each owning one slot range), and `replicas[i]`
    replicating `masters[i]` when the cluster was started with replicas."""

    def __init__(self, nodes: Sequence[RedisServer], replicas: Sequence[RedisServer] = ()) -> None:
        self.nodes = list(nodes)
        """The original masters, in slot order."""
        self.replicas = list(replicas)

    @property
    def url(self) -> str:
        """`redis+cluster://127.0.0.1:p1,127.0.0.1:p2,...`, the form `connect_redis` takes."""
        return "redis+cluster://" + ",".join(
            f"{n.host}:{n.port}" for n in [*self.nodes, *self.replicas]
        )

    def slot_range(self, index: int) -> range:
        """The slots `nodes[index]` was given at start."""
        n = len(self.nodes)
        return range(index * CLUSTER_SLOTS // n, (index + 1) * CLUSTER_SLOTS // n)

    def close(self) -> None:
        """Stop every node and delete their directories."""
        for node in [*self.nodes, *self.replicas]:
            node.close()


def start_redis_cluster(
    n: int = 3, *, replicas: bool = False, node_timeout_ms: int | None = None
) -> RedisClusterServers:
    """Start `n` cluster-enabled masters (plus one replica each with `replicas`), split the
    slots between the masters, join them all, wait for ok (and for every replica's link).

    With replicas, nodes run `cluster-require-full-coverage no`, as the README advises: with
    `yes`, Redis itself refuses every shard's commands (CLUSTERDOWN) while one master is down.
    """
    if n < 1:
        raise ValueError("a cluster needs at least one node")
    extra = [] if node_timeout_ms is None else ["--cluster-node-timeout", str(node_timeout_ms)]
    if replicas:
        extra += ["--cluster-require-full-coverage", "no"]
    nodes: list[RedisServer] = []
    try:
        for _ in range(2 * n if replicas else n):
            node = RedisServer(cluster=True, extra_args=extra)
            nodes.append(node)
            node.start()
        masters, followers = nodes[:n], nodes[n:]
        for index, node in enumerate(masters):
            first = index * CLUSTER_SLOTS // n
            last = (index + 1) * CLUSTER_SLOTS // n - 1
            _expect_ok(send_command(node.port, "CLUSTER", "ADDSLOTSRANGE", first, last))
        # Every pair meets directly, rather than waiting for gossip to introduce them.
        for index, node in enumerate(nodes):
            for other in nodes[index + 1 :]:
                _expect_ok(send_command(node.port, "CLUSTER", "MEET", other.host, other.port))
        _wait_for_cluster_ok(nodes)
        for master, follower in zip(masters, followers, strict=False):
            master_id = send_command(master.port, "CLUSTER", "MYID").split(b"\r\n")[1].decode()
            _expect_ok(send_command(follower.port, "CLUSTER", "REPLICATE", master_id))
        _wait_for_replicas(followers)
    except BaseException:
        for node in nodes:
            node.close()
        raise
    return RedisClusterServers(masters, followers)


@contextlib.contextmanager
def redis_cluster(
    n: int = 3, *, replicas: bool = False, node_timeout_ms: int | None = None
) -> Iterator[RedisClusterServers]:
    """`start_redis_cluster` as a context manager."""
    with start_redis_cluster(n, replicas=replicas, node_timeout_ms=node_timeout_ms) as cluster:
        yield cluster


def _wait_for_replicas(replicas: Sequence[RedisServer]) -> None:
    """Poll until every replica's link to its master is up."""
    deadline = time.monotonic() + _START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        infos = [send_command(node.port, "INFO", "replication") for node in replicas]
        if all(b"master_link_status:up" in info for info in infos):
            return
        time.sleep(_POLL_SECONDS)
    raise RuntimeError("Redis Cluster replicas did not come up")


def _expect_ok(reply: bytes) -> None:
    if not reply.startswith(b"+OK"):
        raise RuntimeError(f"cluster set-up command failed: {reply!r}")


def _wait_for_cluster_ok(nodes: Sequence[RedisServer]) -> None:
    """Poll until every node reports cluster_state:ok and knows every other node."""
    deadline = time.monotonic() + _START_TIMEOUT_SECONDS
    infos: list[bytes] = []
    want_known = f"cluster_known_nodes:{len(nodes)}".encode()
    while time.monotonic() < deadline:
        infos = [send_command(node.port, "CLUSTER", "INFO") for node in nodes]
        if all(b"cluster_state:ok" in info and want_known in info for info in infos):
            return
        time.sleep(_POLL_SECONDS)
    raise RuntimeError(f"Redis Cluster did not reach cluster_state:ok: {infos!r}")
