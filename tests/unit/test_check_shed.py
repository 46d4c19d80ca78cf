"""Overload shedding: a Check that queued in the sidecar past its budget gets a prompt 429.

The wait is Envoy's timeout (its `x-envoy-expected-rq-timeout-ms` header) minus what remains
of the gRPC deadline Envoy set from it. The fake context below derives that deadline from a
FakeClock, as gRPC does from its own clock when the call arrives.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.rpc import code_pb2

from authz.check import EXPECTED_TIMEOUT_HEADER, queue_wait
from authz.decision import SHED_AFTER, overdue
from authz.keys import generate_key
from tests.support.checks import bearer, check_request, denied_headers, ok_client_headers
from tests.support.clock import FakeClock
from tests.support.fakes import workspace
from tests.unit.conftest import Sidecar, Started, start_sidecar

ENVOY_TIMEOUT_MS = 2000


class QueuedCall:
    """A gRPC servicer context for a call that arrived at `arrived_at` on `clock`."""

    def __init__(
        self,
        clock: FakeClock[float],
        *,
        arrived_at: float,
        deadline_ms: int | None = ENVOY_TIMEOUT_MS,
        header: str | None = str(ENVOY_TIMEOUT_MS),
    ) -> None:
        self._clock = clock
        self._arrived_at = arrived_at
        self._deadline_ms = deadline_ms
        self._header = header

    def time_remaining(self) -> float | None:
        if self._deadline_ms is None:
            return None
        return max(0.0, self._arrived_at + self._deadline_ms / 1000 - self._clock())

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        found = [("x-request-id", "abc")]
        if self._header is not None:
            found.append((EXPECTED_TIMEOUT_HEADER, self._header))
        return tuple(found)

    async def abort(self, code: Any, details: str) -> None:
        raise AssertionError(f"aborted: {code} {details}")


@pytest.fixture
async def shedding() -> AsyncIterator[tuple[Sidecar, Started]]:
    sidecar, started = await start_sidecar()
    yield sidecar, started
    await started.stop()


def shed_count(sidecar: Sidecar) -> float:
    value = sidecar.metrics.registry.get_sample_value(
        "authz_checks_total", {"decision": "shed", "code": "server_overloaded"}
    )
    return value or 0.0


def test_the_budget_is_a_quarter_of_envoys_timeout() -> None:
    assert SHED_AFTER == 0.25
    assert not overdue(0.5, 2.0, shed_after=SHED_AFTER)
    assert overdue(0.501, 2.0, shed_after=SHED_AFTER)
    assert not overdue(0.0, 2.0, shed_after=SHED_AFTER)


def test_the_wait_is_envoys_timeout_minus_the_remaining_deadline() -> None:
    clock = FakeClock(100.0)
    call: Any = QueuedCall(clock, arrived_at=100.0)
    clock.now = 100.3
    waited = queue_wait(call)
    assert waited is not None
    assert waited[0] == pytest.approx(0.3)
    assert waited[1] == 2.0


@pytest.mark.parametrize(
    ("deadline_ms", "header"),
    [
        (None, str(ENVOY_TIMEOUT_MS)),  # no deadline: nothing to measure against
        (ENVOY_TIMEOUT_MS, None),  # not Envoy (no header): the timeout is unknown
        (ENVOY_TIMEOUT_MS, "2s"),
        (ENVOY_TIMEOUT_MS, "-5"),
        (ENVOY_TIMEOUT_MS, "٣٠٠"),  # digits, but not ASCII ones
        (ENVOY_TIMEOUT_MS, "9" * 40),
    ],
)
def test_an_unknown_wait_is_never_shed(deadline_ms: int | None, header: str | None) -> None:
    clock = FakeClock(0.0)
    call: Any = QueuedCall(clock, arrived_at=0.0, deadline_ms=deadline_ms, header=header)
    clock.now = 1.9
    assert queue_wait(call) is None


async def test_a_check_past_its_budget_gets_a_prompt_429_and_touches_nothing(
    shedding: tuple[Sidecar, Started],
) -> None:
    sidecar, started = shedding
    servicer = started.app.authorization
    key = generate_key()
    sidecar.store.add(key, workspace(rpm=100))
    request = check_request(headers=bearer(key))
    clock = FakeClock(50.0)

    fresh: Any = QueuedCall(clock, arrived_at=50.0)
    clock.now = 50.5  # exactly the budget: still decided
    first = await servicer.Check(request, fresh)
    assert first.status.code == code_pb2.OK
    lookups = sidecar.store.lookups
    remaining = ok_client_headers(first)["x-ratelimit-remaining-requests"]

    late: Any = QueuedCall(clock, arrived_at=50.0)
    clock.now = 50.51
    shed = await servicer.Check(request, late)

    assert shed.status.code == code_pb2.PERMISSION_DENIED
    assert shed.denied_response.status.code == 429
    assert denied_headers(shed) == {"content-type": "application/json", "retry-after": "1"}
    error = json.loads(shed.denied_response.body)["error"]
    assert (error["code"], error["type"], error["param"]) == (
        "server_overloaded",
        "server_error",
        None,
    )
    assert dict(shed.dynamic_metadata.fields.items()).keys() == {"decision", "code", "type"}
    assert shed.dynamic_metadata.fields["decision"].string_value == "shed"
    assert shed_count(sidecar) == 1
    # Neither the key store nor the buckets saw it.
    assert sidecar.store.lookups == lookups
    again = await servicer.Check(request, QueuedCall(clock, arrived_at=clock.now))  # type: ignore[arg-type]
    assert int(ok_client_headers(again)["x-ratelimit-remaining-requests"]) == int(remaining) - 1


async def test_an_invalid_key_is_shed_too_before_any_work(
    shedding: tuple[Sidecar, Started],
) -> None:
    """Shedding comes first: under overload even a cheap denial is not worth the queue."""
    sidecar, started = shedding
    clock = FakeClock(0.0)
    late: Any = QueuedCall(clock, arrived_at=0.0)
    clock.now = 1.0
    answer = await started.app.authorization.Check(check_request(headers={}), late)
    assert answer.denied_response.status.code == 429
    assert shed_count(sidecar) == 1


async def test_over_grpc_the_wait_comes_from_the_calls_deadline(sidecar: Sidecar) -> None:
    """Envoy's header says 60 s but only 5 s remain: the call waited about 55 s, far past its
    budget. With the header matching the deadline, the same call is decided."""
    key = generate_key()
    sidecar.store.add(key, workspace())
    request = check_request(headers=bearer(key))

    decided = await sidecar.stub.Check(
        request, timeout=5, metadata=((EXPECTED_TIMEOUT_HEADER, "5000"),)
    )
    assert decided.status.code == code_pb2.OK

    shed = await sidecar.stub.Check(
        request, timeout=5, metadata=((EXPECTED_TIMEOUT_HEADER, "60000"),)
    )
    assert shed.denied_response.status.code == 429
    assert json.loads(shed.denied_response.body)["error"]["code"] == "server_overloaded"
    # Without a deadline nothing is measured, so nothing is shed.
    assert (await sidecar.stub.Check(request)).status.code == code_pb2.OK


async def test_3000_checks_at_once_are_all_answered(sidecar: Sidecar) -> None:
    """gRPC's default backlog protection cancelled calls waiting for the sidecar to take them
    (past 1,000: 1,998 of these 3,000 got CANCELLED, a 503 through Envoy)."""
    key = generate_key()
    sidecar.store.add(key, workspace())
    request = check_request(headers=bearer(key))

    async def one() -> int | str:
        try:
            answer = await sidecar.stub.Check(request, timeout=60)
        except grpc.aio.AioRpcError as error:
            return str(error.code().name)
        return int(answer.status.code)

    answers = Counter(await asyncio.gather(*(one() for _ in range(3000))))
    assert answers == {code_pb2.OK: 3000}
