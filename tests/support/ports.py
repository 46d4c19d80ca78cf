"""TCP ports for test servers that no other test process on this machine is handed too.

Binding port 0 and closing the socket only says the port was free a moment ago: the kernel
may give the same just-released port to another pytest run (a second `make test`, maybe from
another clone) before our child binds it, and ports in the ephemeral range can be taken by any
outgoing connection meanwhile. So ports come from outside the kernel's ephemeral range
(/proc/sys/net/ipv4/ip_local_port_range), and each one handed out is reserved machine-wide by
a file named after it in a shared directory under the system temp dir, holding the owner's
pid. A reservation is kept until its owner exits (atexit removes it); one whose owner is gone,
or older than a generous lease, is taken over. A port is handed out only if it can be bound
right now, and the search starts at a random offset so concurrent runs rarely meet.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import functools
import os
import random
import socket
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

# Below the usual ephemeral range (32768-60999 on Linux) and above common services (Postgres
# 5432, Redis 6379, 8080, Envoy's 9901...).
_PREFERRED_FIRST = 20000
_MIN_RANGE_SIZE = 2000
_EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_DEFAULT_EPHEMERAL = (32768, 60999)
_BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")
# Only protects against a live process whose reservation outlived it in some way we cannot
# see (a recycled pid on a system without /proc); a test session is far shorter than this.
DEFAULT_LEASE_SECONDS = 24 * 3600.0
# A reservation file whose content cannot be read (its owner died between creating and
# writing it) is taken over after this long.
_UNREADABLE_GRACE_SECONDS = 60.0


def ephemeral_range(path: Path = _EPHEMERAL_RANGE_FILE) -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports, inclusive."""
    try:
        first, last = (int(part) for part in path.read_text().split())
    except (OSError, ValueError):
        return _DEFAULT_EPHEMERAL
    return first, last


def port_range_for_tests(ephemeral: tuple[int, int]) -> range:
    """Where test ports come from: below the ephemeral range (or above it, if that has more
    room); the whole unprivileged range only on a machine whose ephemeral range leaves none."""
    first, last = ephemeral
    below = range(_PREFERRED_FIRST, first)
    above = range(max(last + 1, _PREFERRED_FIRST), 65536)
    best = max(below, above, key=len)
    return best if len(best) >= _MIN_RANGE_SIZE else range(_PREFERRED_FIRST, 65536)


def _process_identity(pid: int) -> str:
    """`<boot id>:<start time>` of process `pid`, or "unknown" when /proc cannot tell.

    A pid alone can be recycled by an unrelated process; its start time (and the boot) cannot.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = _BOOT_ID_FILE.read_text().strip()
    except OSError:
        return "unknown"
    # Field 22 (starttime); the command name before it may contain spaces, so skip past ")".
    return f"{boot}:{stat.rpartition(')')[2].split()[19]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


class PortReservations:
    """Reserves ports in `directory` on behalf of this process until it exits."""

    def __init__(
        self,
        directory: Path,
        ports: range,
        *,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        host: str = "127.0.0.1",
    ) -> None:
        self.directory = directory
        self.ports = ports
        self.lease_seconds = lease_seconds
        self.host = host
        self._held: set[int] = set()
        self._pid = os.getpid()
        self._owner = f"{self._pid} {_process_identity(self._pid)}\n"

    def reserve(self, offsets: Sequence[int] = (0,)) -> int:
        """A port p such that p + offset is free and now reserved by us for every offset.

        `(0,)` is one port, `range(n)` n ports in a row, `(0, 10000)` a Redis Cluster node and
        its bus port.
        """
        span = max(offsets)
        candidates = range(self.ports.start, self.ports.stop - span)
        if not candidates or min(offsets) < 0:
            raise ValueError(f"offsets {list(offsets)} do not fit in ports {self.ports}")
        start = random.randrange(len(candidates))
        with self._locked():
            self._refresh_owner()
            for index in range(len(candidates)):
                first = candidates[(start + index) % len(candidates)]
                if self._try_reserve([first + offset for offset in offsets]):
                    return first
        raise RuntimeError(
            f"no free ports for offsets {list(offsets)} in {self.ports.start}-"
            f"{self.ports.stop - 1}: reservations are in {self.directory}"
        )

    def release_all(self) -> None:
        """Remove this process's reservations (at exit; harmless to call twice)."""
        if os.getpid() != self._pid:
            return  # a forked child: the reservations are its parent's
        with self._locked():
            for port in sorted(self._held):
                with contextlib.suppress(OSError):
                    if self._path(port).read_text() == self._owner:
                        self._path(port).unlink()
            self._held.clear()

    def _refresh_owner(self) -> None:
        """A forked child reserves under its own pid (and leaves its parent's alone)."""
        if os.getpid() != self._pid:
            self._pid = os.getpid()
            self._owner = f"{self._pid} {_process_identity(self._pid)}\n"
            self._held = set()

    def _try_reserve(self, ports: list[int]) -> bool:
        """Reserve all of `ports` or none (the caller holds the directory lock)."""
        taken: list[int] = []
        for port in ports:
            if not self._claim(port):
                break
            taken.append(port)
            if not self._bindable(port):
                break
        else:
            self._held.update(taken)
            return True
        for port in taken:
            with contextlib.suppress(OSError):
                self._path(port).unlink()
        return False

    def _claim(self, port: int) -> bool:
        """Create the port's reservation file, taking over a stale one."""
        path = self._path(port)
        for _ in range(2):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                if not self._stale(path):
                    return False
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
                except OSError:
                    return False  # e.g. another user's file in the sticky directory
                continue
            with os.fdopen(fd, "w") as file:
                file.write(self._owner)
            return True
        return False

    def _stale(self, path: Path) -> bool:
        """Whether a reservation's owner is gone (or its lease ran out)."""
        try:
            age = time.time() - path.stat().st_mtime
            content = path.read_text()
        except FileNotFoundError:
            return True
        except OSError:
            return False
        if age > self.lease_seconds:
            return True
        pid_text, _, identity = content.strip().partition(" ")
        if not pid_text.isdigit():
            return age > _UNREADABLE_GRACE_SECONDS
        pid = int(pid_text)
        if not _pid_alive(pid):
            return True
        current = _process_identity(pid)  # alive, but is it still the process that reserved?
        return "unknown" not in (current, identity) and current != identity

    def _bindable(self, port: int) -> bool:
        """Nothing listens on or is bound to the port now (no SO_REUSEADDR: a connection
        lingering in TIME_WAIT on it counts as taken)."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((self.host, port))
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
                    return False
                raise
        return True

    def _path(self, port: int) -> Path:
        return self.directory / str(port)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise reservations machine-wide, so taking over a stale file cannot race.

        flock is dropped by the kernel when its holder dies, so the lock itself never goes
        stale; it is held for a few system calls per port.
        """
        _make_shared_directory(self.directory)
        fd = os.open(self.directory / ".lock", os.O_RDONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _make_shared_directory(directory: Path) -> None:
    """Create `directory` writable by every user, sticky like /tmp (others' files stay)."""
    if directory.is_dir():
        return
    with contextlib.suppress(FileExistsError):
        directory.mkdir(parents=True)
        with contextlib.suppress(OSError):
            directory.chmod(0o1777)


def shared_directory() -> Path:
    """Where every test process on this machine keeps its reservations."""
    return Path(tempfile.gettempdir()) / "authz-test-ports"


@functools.cache
def machine_reservations() -> PortReservations:
    """This process's reservations in the machine-wide directory, released at exit."""
    reservations = PortReservations(shared_directory(), port_range_for_tests(ephemeral_range()))
    atexit.register(reservations.release_all)
    return reservations
