"""A throwaway PgBouncer in transaction mode in front of a test PostgreSQL (Debian `pgbouncer`).

Transaction pooling is what large fleets put in front of PostgreSQL, and it breaks two things
a naive client relies on: prepared statements across transactions, and LISTEN/NOTIFY. The
tests start one to prove the store works through it when configured as the README says.
"""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from tests.support.procs import ManagedProcess, free_port

_BINARY_PATHS = ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer")
_ROOT_RUNS_AS = "postgres"  # PgBouncer refuses to run as root
SERVER_POOL_SIZE = 4
"""Server connections PgBouncer opens per database and user, however many clients it has."""


def find_pgbouncer() -> str | None:
    """The pgbouncer binary, or None when it is not installed."""
    found = shutil.which("pgbouncer")
    if found:
        return found
    return next((path for path in _BINARY_PATHS if os.access(path, os.X_OK)), None)


def _config(server_dsn: str, port: int, folder: Path) -> str:
    parts = urlsplit(server_dsn)
    user = unquote(parts.username or "postgres")
    password = unquote(parts.password or "")
    server = f"host={parts.hostname} port={parts.port or 5432} user={user}"
    if password:
        server += f" password={password}"
    (folder / "users.txt").write_text(f'"{user}" ""\n')
    return "\n".join(
        [
            "[databases]",
            f"* = {server}",
            "[pgbouncer]",
            "listen_addr = 127.0.0.1",
            f"listen_port = {port}",
            "unix_socket_dir =",
            "auth_type = trust",
            f"auth_file = {folder / 'users.txt'}",
            "pool_mode = transaction",
            f"default_pool_size = {SERVER_POOL_SIZE}",
            "max_client_conn = 200",
            "ignore_startup_parameters = extra_float_digits",
            "",
        ]
    )


def through(bouncer_port: int, dsn: str) -> str:
    """`dsn` (any database on the server) as reached through the bouncer."""
    parts = urlsplit(dsn)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = (
        f"{credentials}@127.0.0.1:{bouncer_port}" if credentials else f"127.0.0.1:{bouncer_port}"
    )
    return urlunsplit(parts._replace(netloc=netloc))


@contextmanager
def pgbouncer_for(server_dsn: str, binary: str) -> Iterator[int]:
    """Run PgBouncer in transaction mode for `server_dsn`'s server; yields its port."""
    run_as = _ROOT_RUNS_AS if os.geteuid() == 0 else None
    folder = Path(tempfile.mkdtemp(prefix="authz-pgbouncer-"))
    try:
        port = free_port()
        config = folder / "pgbouncer.ini"
        config.write_text(_config(server_dsn, port, folder))
        if run_as is not None:
            entry = pwd.getpwnam(run_as)
            for path in (folder, config, folder / "users.txt"):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        with ManagedProcess(
            [binary, str(config)], log_dir=folder, name="pgbouncer", user=run_as
        ) as bouncer:
            bouncer.wait_for_port(port, timeout=20)
            yield port
    finally:
        shutil.rmtree(folder, ignore_errors=True)
