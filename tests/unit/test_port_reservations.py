"""Ports handed to test servers never collide across test processes running side by side.

Two `make test` runs at once used to get the same just-released port from bind(0), and one
child then failed to bind. These tests run the real helpers in separate processes.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
import time
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest

from tests.support.ports import (
    PortReservations,
    ephemeral_range,
    shared_directory,
)
from tests.support.procs import free_port, free_ports_in_a_row
from tests.support.redis_servers import free_port as redis_free_port

_PORTS_PER_PROCESS = 150
_ROW = 3


def _take_ports(barrier: Barrier, results: Queue[list[int]]) -> None:
    """One "test run": many single ports and rows, all while the other run takes its own."""
    barrier.wait()
    taken: list[int] = []
    for index in range(_PORTS_PER_PROCESS):
        if index % 10 == 0:
            first = free_ports_in_a_row(_ROW)
            taken.extend(range(first, first + _ROW))
        else:
            taken.append(free_port())
    results.put(taken)
    barrier.wait()  # keep our reservations until the other run has taken all of its ports


def test_concurrent_processes_never_get_the_same_port() -> None:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    results: Queue[list[int]] = context.Queue()
    runs = [context.Process(target=_take_ports, args=(barrier, results)) for _ in range(2)]
    for run in runs:
        run.start()
    taken = [results.get(timeout=60), results.get(timeout=60)]
    for run in runs:
        run.join(timeout=60)
        assert run.exitcode == 0
    everything = taken[0] + taken[1]
    assert len(set(everything)) == len(everything)


def test_ports_are_outside_the_ephemeral_range() -> None:
    """Outgoing connections (any process's) get local ports from the ephemeral range, so a
    port from there could be taken between free_port() and the child's bind."""
    first, last = ephemeral_range()
    ports = [free_port() for _ in range(50)]
    first_of_row = free_ports_in_a_row(4)
    ports.extend(range(first_of_row, first_of_row + 4))
    assert not [port for port in ports if first <= port <= last]


def test_a_row_is_consecutive_reserved_and_bindable() -> None:
    first = free_ports_in_a_row(5)
    for port in range(first, first + 5):
        owner = (shared_directory() / str(port)).read_text().split()[0]
        assert owner == str(os.getpid())
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
    later = {free_port() for _ in range(100)}
    assert not later & set(range(first, first + 5))


def test_a_redis_cluster_node_gets_its_bus_port_reserved_too() -> None:
    port = redis_free_port(cluster_bus=True)
    for reserved in (port, port + 10000):
        assert (shared_directory() / str(reserved)).read_text().split()[0] == str(os.getpid())


def test_a_process_releases_its_reservations_when_it_exits() -> None:
    script = "from tests.support.procs import free_port; print(free_port(), flush=True)"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert not (shared_directory() / done.stdout.strip()).exists()


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def one_port(tmp_path: Path) -> PortReservations:
    """Reservations in a private directory over a single port that is free right now (and
    kept free machine-wide by this process's own reservation)."""
    port = free_port()
    return PortReservations(tmp_path / "reservations", range(port, port + 1))


def _reserve_for(reservations: PortReservations, owner: str, *, age: float = 0.0) -> Path:
    """Write the port's reservation file as another process would have."""
    port = reservations.ports.start
    reservations.directory.mkdir(exist_ok=True)
    path = reservations.directory / str(port)
    path.write_text(owner)
    if age:
        os.utime(path, (time.time() - age, time.time() - age))
    return path


def test_a_reservation_by_a_dead_process_is_taken_over(one_port: PortReservations) -> None:
    path = _reserve_for(one_port, f"{_dead_pid()} unknown\n")
    assert one_port.reserve() == one_port.ports.start
    assert path.read_text().split()[0] == str(os.getpid())


def test_a_reservation_by_a_live_process_is_respected(one_port: PortReservations) -> None:
    parent = os.getppid()
    identity = Path(f"/proc/{parent}/stat").read_text().rpartition(")")[2].split()[19]
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    _reserve_for(one_port, f"{parent} {boot}:{identity}\n")
    with pytest.raises(RuntimeError, match="no free ports"):
        one_port.reserve()


def test_a_reservation_whose_pid_was_recycled_is_taken_over(one_port: PortReservations) -> None:
    """The pid is alive but is another process than the one that reserved the port."""
    _reserve_for(one_port, f"{os.getppid()} some-earlier-boot:12345\n")
    assert one_port.reserve() == one_port.ports.start


def test_a_reservation_past_its_lease_is_taken_over(one_port: PortReservations) -> None:
    _reserve_for(one_port, f"{os.getppid()} unknown\n", age=one_port.lease_seconds + 60)
    assert one_port.reserve() == one_port.ports.start


def test_a_port_in_use_is_not_handed_out_even_if_unreserved(one_port: PortReservations) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", one_port.ports.start))
        squatter.listen()
        with pytest.raises(RuntimeError, match="no free ports"):
            one_port.reserve()
    assert not (one_port.directory / str(one_port.ports.start)).exists()


def test_release_removes_only_this_process_reservations(one_port: PortReservations) -> None:
    port = one_port.reserve()
    one_port.release_all()
    assert not (one_port.directory / str(port)).exists()
    other = _reserve_for(one_port, f"{os.getppid()} unknown\n")
    one_port.release_all()
    assert other.exists()
