"""Process helpers shared by the integration and end-to-end tests.

Tests start real servers (Postgres, Envoy, the sidecar, the demo upstream). These helpers make
sure each one gets a free port, is waited for with a deadline instead of a fixed sleep, has
everything it printed kept in a log file the test can grep, and is always stopped together with
its children, even when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import socket
import subprocess
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from tests.support.ports import machine_reservations

_POLL_INTERVAL = 0.02


class ClosesOnExit:
    """`with thing:` closes it at the end of the block, pass or fail."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 for a child process to listen on.

    Nothing listens on it now, and no other test process on this machine (another pytest run,
    another clone's `make test`) is handed it until this process exits: see tests/support/
    ports.py. So parallel tests and suites do not collide on ports.
    """
    return machine_reservations().reserve()


def free_ports_in_a_row(count: int) -> int:
    """The first of `count` consecutive free ports, all reserved like free_port()'s
    (AUTHZ_WORKERS: worker i's metrics port is AUTHZ_METRICS_ADDR's port + i)."""
    return machine_reservations().reserve(range(count))


def wait_for_port(
    host: str,
    port: int,
    *,
    timeout: float,
    proc: subprocess.Popen[bytes] | None = None,
) -> None:
    """Poll until something accepts TCP connections on host:port, or raise TimeoutError.

    If `proc` is given and exits first, fail at once instead of waiting out the deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"nothing listening on {host}:{port} after {timeout:.1f}s")
        if proc is not None and (code := peek_exit_code(proc)) is not None:
            raise RuntimeError(
                f"process {proc.pid} exited with {code} before listening on {host}:{port}"
            )
        try:
            with socket.create_connection((host, port), timeout=min(remaining, 0.5)):
                return
        except OSError:
            time.sleep(_POLL_INTERVAL)


def _signal_group_or_process(pid: int, sig: int, *, group: bool) -> None:
    """Send `sig` to the process group led by `pid` (or to `pid` alone); ignore if gone."""
    with contextlib.suppress(ProcessLookupError):
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def _leads_own_group(proc: subprocess.Popen[bytes]) -> bool:
    """Tell whether `proc` was started in its own process group (start_new_session=True)."""
    try:
        return os.getpgid(proc.pid) == proc.pid
    except ProcessLookupError:
        return False


def peek_exit_code(proc: subprocess.Popen[bytes]) -> int | None:
    """The exit code if `proc` has exited, else None, without reaping it.

    An unreaped child keeps its pid and process group id reserved, so signalling the group
    afterwards cannot hit an unrelated process that was handed a recycled pid (pid_max can be
    as low as 32768). Codes follow Popen: -N when killed by signal N.
    """
    if proc.returncode is not None:
        return proc.returncode
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return proc.poll()  # someone else reaped it; let Popen settle its returncode
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def wait_unreaped(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """Wait for `proc` to exit and return its exit code, leaving it unreaped.

    Raises subprocess.TimeoutExpired after `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    while (code := peek_exit_code(proc)) is None:
        if time.monotonic() >= deadline:
            raise subprocess.TimeoutExpired(proc.args, timeout)
        time.sleep(0.01)
    return code


def stop_process(
    proc: subprocess.Popen[bytes],
    *,
    timeout: float = 5.0,
    group: bool | None = None,
) -> int:
    """Stop `proc` with SIGTERM, then SIGKILL after `timeout`; return its exit code.

    When the child leads its own process group (auto-detected unless `group` is given), the
    whole group is signalled so grandchildren (Postgres backends, worker processes) go too,
    and stragglers get SIGKILL before the leader is reaped. A process that already exited is
    fine; one already reaped is left alone, since its pid may now be someone else's.
    """
    if proc.returncode is not None:
        return proc.returncode
    if group is None:
        group = _leads_own_group(proc)
    if peek_exit_code(proc) is None:
        _signal_group_or_process(proc.pid, signal.SIGTERM, group=group)
        try:
            wait_unreaped(proc, timeout)
        except subprocess.TimeoutExpired:
            _signal_group_or_process(proc.pid, signal.SIGKILL, group=group)
    if group:
        _signal_group_or_process(proc.pid, signal.SIGKILL, group=True)
    return proc.wait()


def child_identity(user: str | None) -> tuple[int | None, int | None, list[int] | None]:
    """Popen `user`, `group`, `extra_groups` that drop root to `user` (initdb refuses root)."""
    if user is None:
        return None, None, None
    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid, []


def _finalize(proc: subprocess.Popen[bytes], log_file: IO[bytes]) -> None:
    """Last-resort cleanup when a ManagedProcess is garbage-collected or Python exits."""
    try:
        stop_process(proc, timeout=2.0, group=True)
    finally:
        log_file.close()


class ManagedProcess(ClosesOnExit):
    """A child process in its own process group whose stdout and stderr go to a log file.

    Starts on construction, like `subprocess.Popen`. Use it as a context manager (or call
    `stop()`) so the process and all its children are gone when the test ends, pass or fail.
    The log is opened in append mode so restarting a server under the same name keeps one
    file with everything it ever printed.
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        log_dir: Path,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        inherit_env: bool = True,
        cwd: Path | None = None,
        user: str | None = None,
    ) -> None:
        """Start `args`; `env` is added over the inherited environment (or replaces it)."""
        self.name = name or Path(args[0]).name
        self.log_path = Path(log_dir) / f"{self.name}.log"
        child_env = dict(os.environ) if inherit_env else {}
        child_env.update(env or {})
        uid, gid, extra_groups = child_identity(user)
        log_file = self.log_path.open("ab")
        try:
            self.proc: subprocess.Popen[bytes] = subprocess.Popen(
                list(args),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=child_env,
                cwd=cwd,
                start_new_session=True,
                user=uid,
                group=gid,
                extra_groups=extra_groups,
            )
        except BaseException:
            log_file.close()
            raise
        self._log_file = log_file
        self._finalizer = weakref.finalize(self, _finalize, self.proc, log_file)

    @property
    def pid(self) -> int:
        """The child's pid, which is also its process group id."""
        return self.proc.pid

    def read_log(self) -> str:
        """Everything the process printed so far (stdout and stderr interleaved)."""
        return self.log_path.read_bytes().decode("utf-8", errors="replace")

    def is_running(self) -> bool:
        """True while the process has not exited."""
        return peek_exit_code(self.proc) is None

    def send_signal(self, sig: int, *, group: bool = False) -> None:
        """Signal the process (or its whole group), e.g. SIGTERM to test graceful shutdown."""
        if self.proc.returncode is None:  # not reaped, so the pid is still ours
            _signal_group_or_process(self.proc.pid, sig, group=group)

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit and return its exit code.

        Raises subprocess.TimeoutExpired if it is still running after `timeout` seconds. The
        child is not reaped yet, so `stop()` can still clean up what it left in its group.
        """
        return wait_unreaped(self.proc, timeout)

    def wait_for_port(self, port: int, *, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        """Wait until the process listens on `port`; on failure the error includes its log."""
        try:
            wait_for_port(host, port, timeout=timeout, proc=self.proc)
        except (TimeoutError, RuntimeError) as exc:
            raise type(exc)(f"{exc}; {self.name} log:\n{self.read_log()}") from None

    def stop(self, *, timeout: float = 5.0) -> int:
        """Stop the process group (SIGTERM, then SIGKILL) and return the exit code."""
        self._finalizer.detach()
        try:
            return stop_process(self.proc, timeout=timeout, group=True)
        finally:
            self._log_file.close()

    def close(self) -> None:
        self.stop()
