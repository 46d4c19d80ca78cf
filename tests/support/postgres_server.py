"""PostgreSQL for tests: reuse a server named in the environment, or start a throwaway one.

The rule, like asyncpg's own test base: if `AUTHZ_TEST_DATABASE_URL` is set, tests use that
server; otherwise they start a private server from the local binaries (found on PATH, then via
`pg_config --bindir`, then under /usr/lib/postgresql/*/bin) in a temporary directory (in RAM
under /dev/shm when possible, else /tmp), on a free 127.0.0.1 port, with trust auth and fsync
off. Each test then gets its own database from
`create_database`, so tests never see each other's rows.

initdb and postgres refuse to run as root; when the tests run as root the server runs as the
`postgres` OS user (Popen's `user=`/`group=`, no shell or runuser involved), and the temporary
directory is made traversable (0o755) and chowned to that user.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
import weakref
from collections.abc import Callable, Coroutine, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import asyncpg

from tests.support.procs import ClosesOnExit, ManagedProcess, child_identity, free_port

DATABASE_URL_ENV = "AUTHZ_TEST_DATABASE_URL"
_SERVER_BINARIES = ("initdb", "postgres")
_ROOT_RUNS_AS = "postgres"
_START_TIMEOUT = 30.0
_POLL_INTERVAL = 0.02
_PORT_ATTEMPTS = 3
_SHARED_MEMORY_DIR = Path("/dev/shm")
_MIN_SHM_BYTES = 1 << 30  # a cluster with WAL and a few dozen test databases fits easily

_T = TypeVar("_T")


class PostgresNotFoundError(RuntimeError):
    """No PostgreSQL server binaries here and no AUTHZ_TEST_DATABASE_URL to use instead."""


class PostgresStartError(RuntimeError):
    """The throwaway server did not become ready; the message carries its log."""


def find_postgres_bindir(environ: Mapping[str, str] | None = None) -> Path:
    """Find the directory holding the server binaries (initdb and postgres).

    Looks on PATH first (so a developer's choice wins), then asks `pg_config --bindir`, then
    takes the newest /usr/lib/postgresql/*/bin (Debian puts the server binaries there).
    """
    path = (os.environ if environ is None else environ).get("PATH")
    candidates: list[Path] = []
    initdb = shutil.which("initdb", path=path)
    if initdb is not None:
        candidates.append(Path(initdb).resolve().parent)
    pg_config = shutil.which("pg_config", path=path)
    if pg_config is not None:
        result = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False
        )
        if result.returncode == 0 and result.stdout.strip():
            candidates.append(Path(result.stdout.strip()))
    candidates.extend(
        sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    )
    for bindir in candidates:
        if all((bindir / name).is_file() for name in _SERVER_BINARIES):
            return bindir
    raise PostgresNotFoundError(
        "PostgreSQL server binaries (initdb, postgres) not found on PATH, via "
        f"pg_config or in /usr/lib/postgresql/*/bin; install PostgreSQL or set {DATABASE_URL_ENV}"
    )


def _version_key(bindir: Path) -> tuple[int, ...]:
    """Sort /usr/lib/postgresql/<version>/bin by numeric version, newest last."""
    return tuple(int(part) for part in re.findall(r"\d+", bindir.parent.name))


class PostgresServer(ClosesOnExit):
    """A throwaway PostgreSQL server in a temporary directory, listening on 127.0.0.1 only.

    `stop()`/`kill()` and `start()` keep the port and data directory, so fault tests can take
    the database away and bring it back under the same DSN. `close()` (or leaving the `with`
    block) stops it and deletes the directory.
    """

    def __init__(
        self, *, bindir: Path, base_dir: Path, port: int, run_as: str | None = None
    ) -> None:
        """Describe a server; `initdb()` and `start()` make it real."""
        self.bindir = bindir
        self.base_dir = base_dir
        self.port = port
        self.run_as = run_as
        self.data_dir = base_dir / "data"
        self.socket_dir = base_dir / "socket"
        self._process: ManagedProcess | None = None
        self._finalizer = weakref.finalize(self, shutil.rmtree, base_dir, ignore_errors=True)

    @property
    def dsn(self) -> str:
        """DSN of the default `postgres` database as the `postgres` superuser."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def log_path(self) -> Path:
        """Everything the server printed across all its starts."""
        return self.base_dir / "postgres.log"

    def read_log(self) -> str:
        """The server log so far, for assertions and failure messages."""
        if not self.log_path.exists():
            return ""
        return self.log_path.read_bytes().decode("utf-8", errors="replace")

    @property
    def pid(self) -> int | None:
        """The postmaster's pid (also its process group id) while it runs."""
        return self._process.pid if self._process is not None else None

    def is_running(self) -> bool:
        """True while the postmaster process is alive."""
        return self._process is not None and self._process.is_running()

    def initdb(self) -> None:
        """Create the cluster: trust auth, superuser `postgres`, C locale, no fsync."""
        uid, gid, extra_groups = child_identity(self.run_as)
        result = subprocess.run(
            [
                str(self.bindir / "initdb"),
                "--pgdata",
                str(self.data_dir),
                "--username",
                "postgres",
                "--auth",
                "trust",
                "--encoding",
                "UTF8",
                "--locale",
                "C",
                "--no-sync",
                "--no-instructions",
            ],
            cwd=self.base_dir,
            capture_output=True,
            text=True,
            check=False,
            user=uid,
            group=gid,
            extra_groups=extra_groups,
        )
        if result.returncode != 0:
            raise PostgresStartError(
                f"initdb failed with exit code {result.returncode}:\n{result.stdout}{result.stderr}"
            )

    def start(self, *, timeout: float = _START_TIMEOUT) -> None:
        """Start postgres on the same port and data directory and wait until it is ready."""
        if self.is_running():
            return
        self._process = ManagedProcess(
            [
                str(self.bindir / "postgres"),
                "-D",
                str(self.data_dir),
                "-p",
                str(self.port),
                "-k",
                str(self.socket_dir),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "wal_init_zero=off",
            ],
            log_dir=self.base_dir,
            name="postgres",
            env={"LC_ALL": "C", "TZ": "UTC"},
            cwd=self.base_dir,
            user=self.run_as,
        )
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        """Poll postmaster.pid for the "ready" status pg_ctl itself waits for."""
        process = self._process
        assert process is not None
        pid_file = self.data_dir / "postmaster.pid"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not process.is_running():
                self._process = None
                code = process.stop()
                raise PostgresStartError(
                    f"postgres exited with code {code} on port {self.port}:\n{self.read_log()}"
                )
            if _postmaster_ready(pid_file, process.pid):
                return
            time.sleep(_POLL_INTERVAL)
        self._process = None
        process.stop()
        raise PostgresStartError(
            f"postgres on port {self.port} not ready after {timeout:.0f}s:\n{self.read_log()}"
        )

    def stop(self, *, timeout: float = 10.0) -> None:
        """Fast shutdown (SIGINT: roll back sessions, checkpoint, exit); keeps the data."""
        self._shutdown(signal.SIGINT, timeout=timeout)

    def kill(self, *, timeout: float = 10.0) -> None:
        """Immediate shutdown, as `pg_ctl stop -m immediate` (SIGQUIT): a crash, no checkpoint.

        The next `start()` goes through crash recovery, like a real database outage.
        """
        self._shutdown(signal.SIGQUIT, timeout=timeout)

    def _shutdown(self, sig: signal.Signals, *, timeout: float) -> None:
        """Send the postmaster its shutdown-mode signal, then make sure the group is gone."""
        process, self._process = self._process, None
        if process is None:
            return
        process.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout)
        process.stop(timeout=timeout)

    def close(self) -> None:
        """Stop the server and delete its directory."""
        try:
            self.kill()
        finally:
            self._finalizer()


def _postmaster_ready(pid_file: Path, pid: int) -> bool:
    """True once postmaster.pid names `pid` and its status line says "ready"."""
    try:
        lines = pid_file.read_text().splitlines()
    except (FileNotFoundError, PermissionError):
        return False
    # Line 1 is the pid, line 8 the status (PostgreSQL 10+): "starting", "ready", "stopping".
    return len(lines) >= 8 and lines[0].strip() == str(pid) and lines[7].strip() == "ready"


def _temp_root(run_as: str | None) -> Path:
    """Where throwaway clusters live: RAM if roomy, since CREATE DATABASE on disk is 10x slower.

    /dev/shm and /tmp are world-traversable, which the `postgres` user needs when we are root.
    """
    fallback = Path("/tmp") if run_as else Path(tempfile.gettempdir())
    if _usable_dir(_SHARED_MEMORY_DIR) and _free_bytes(_SHARED_MEMORY_DIR) >= _MIN_SHM_BYTES:
        return _SHARED_MEMORY_DIR
    if _usable_dir(fallback):
        return fallback
    raise PostgresStartError("no writable temporary directory for a throwaway PostgreSQL server")


def _usable_dir(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def _free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def _make_base_dir(run_as: str | None) -> Path:
    """A temporary directory the server's OS user can reach and own."""
    base_dir = Path(tempfile.mkdtemp(prefix="authz-pg-", dir=_temp_root(run_as)))
    if run_as is not None:
        base_dir.chmod(0o755)
        entry = pwd.getpwnam(run_as)
        os.chown(base_dir, entry.pw_uid, entry.pw_gid)
    return base_dir


def start_postgres_server(*, timeout: float = _START_TIMEOUT) -> PostgresServer:
    """Start a new throwaway server (always new: fault tests stop and kill it at will).

    The caller owns it: use `with start_postgres_server() as server:` or call `close()`.
    """
    bindir = find_postgres_bindir()
    run_as = _ROOT_RUNS_AS if os.geteuid() == 0 else None
    base_dir = _make_base_dir(run_as)
    server = PostgresServer(bindir=bindir, base_dir=base_dir, port=free_port(), run_as=run_as)
    try:
        server.initdb()
        server.socket_dir.mkdir()
        if run_as is not None:
            shutil.chown(server.socket_dir, run_as, run_as)
        _start_on_some_free_port(server, timeout=timeout)
    except BaseException:
        server.close()
        raise
    return server


def _start_on_some_free_port(server: PostgresServer, *, timeout: float) -> None:
    """Start `server`, picking another port if someone grabbed the free one first."""
    for attempt in range(1, _PORT_ATTEMPTS + 1):
        try:
            server.start(timeout=timeout)
            return
        except PostgresStartError:
            if attempt == _PORT_ATTEMPTS or "could not bind" not in server.read_log():
                raise
            server.port = free_port()


@contextlib.contextmanager
def postgres_dsn_for_tests(environ: Mapping[str, str] | None = None) -> Iterator[str]:
    """Yield a base DSN: `AUTHZ_TEST_DATABASE_URL` if set, else a throwaway server's.

    Pair it with `create_database` so each test gets a fresh database on that server.
    """
    configured = (os.environ if environ is None else environ).get(DATABASE_URL_ENV)
    if configured:
        yield configured
        return
    with start_postgres_server() as server:
        yield server.dsn


def dsn_with_database(dsn: str, database: str) -> str:
    """The same URL-style DSN pointing at another database (options such as sslmode kept)."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{quote(database, safe='')}"))


def _run_async(factory: Callable[[], Coroutine[None, None, _T]]) -> _T:
    """Run a coroutine to completion from sync code, even inside a running event loop.

    A private loop in a worker thread keeps these helpers usable from both sync and async
    fixtures without tying asyncpg connections to the test's loop.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


async def _execute(dsn: str, statement: str) -> None:
    """Run one statement on a short-lived connection."""
    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


def _quote_identifier(name: str) -> str:
    """Quote a database name for SQL, since drop_database takes names from a caller's DSN."""
    return '"' + name.replace('"', '""') + '"'


def create_database(base_dsn: str) -> str:
    """Create a fresh, uniquely named database on `base_dsn`'s server and return its DSN.

    Copies template0, which is never connected to, so creation neither waits nor inherits
    objects another test left in template1.
    """
    name = f"authz_test_{uuid.uuid4().hex[:16]}"
    _run_async(
        lambda: _execute(base_dsn, f"CREATE DATABASE {_quote_identifier(name)} TEMPLATE template0")
    )
    return dsn_with_database(base_dsn, name)


def drop_database(base_dsn: str, dsn: str) -> None:
    """Drop the database `dsn` names, closing any connections a test left open."""
    name = unquote(urlsplit(dsn).path.lstrip("/"))
    if not name:
        raise ValueError(f"DSN names no database: {dsn!r}")
    _run_async(
        lambda: _execute(
            base_dsn, f"DROP DATABASE IF EXISTS {_quote_identifier(name)} WITH (FORCE)"
        )
    )
