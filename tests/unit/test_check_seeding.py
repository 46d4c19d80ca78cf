"""A Check that finds the month's counters missing seeds them before deciding (issue 18,
finding 5): never an admission on a zero, one seed per workspace, the failure mode when the
ledger cannot answer. The real app, the in-process limiter, a fake store."""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import replace
from datetime import UTC, datetime

import grpc
import pytest
from google.rpc import code_pb2

from authz.keys import generate_key
from authz.store.base import StoreUnavailable
from tests.support.checks import bearer, check_request, ok_upstream_headers
from tests.support.fakes import FakeStore, ledger_row, workspace
from tests.unit.conftest import Sidecar, start_sidecar

QUOTA = 1000


def used_up_month(store: FakeStore, tokens: int = QUOTA) -> str:
    """A key whose workspace has a QUOTA-token month with `tokens` already in the ledger."""
    key = generate_key()
    grant = store.add(key, replace(workspace(), monthly_token_quota=QUOTA))
    # The sidecar's clock starts in 1970-01.
    row = ledger_row(grant.workspace_id, grant.key_id, datetime.fromtimestamp(0, UTC), tokens)
    store.batches[uuid.uuid4().hex] = [row]
    return key


def status_of(response: object) -> int:
    if response.HasField("ok_response"):  # type: ignore[attr-defined]
        return 200
    return int(response.denied_response.status.code)  # type: ignore[attr-defined]


async def test_a_new_process_refuses_the_first_check_over_a_used_up_month(
    sidecar: Sidecar,
) -> None:
    key = used_up_month(sidecar.store)
    response = await sidecar.stub.Check(check_request(headers=bearer(key)))
    assert response.denied_response.status.code == 429
    assert json.loads(response.denied_response.body)["error"]["code"] == "insufficient_quota"


async def test_a_month_with_room_left_is_admitted_after_the_seed(sidecar: Sidecar) -> None:
    key = used_up_month(sidecar.store, tokens=QUOTA - 100)
    response = await sidecar.stub.Check(check_request(headers=bearer(key)))
    assert response.status.code == code_pb2.OK


async def test_concurrent_checks_share_one_seed(sidecar: Sidecar) -> None:
    key = used_up_month(sidecar.store)
    calls = 0
    release = asyncio.Event()
    real = sidecar.store.period_totals

    async def slow_totals(workspace_id: str, since: datetime, until: datetime) -> tuple[int, float]:
        nonlocal calls
        calls += 1
        await release.wait()
        return await real(workspace_id, since, until)

    sidecar.store.period_totals = slow_totals  # type: ignore[method-assign]
    request = check_request(headers=bearer(key))
    checks = [asyncio.ensure_future(sidecar.stub.Check(request)) for _ in range(20)]
    while calls == 0:
        await asyncio.sleep(0.01)
    release.set()
    statuses = [status_of(r) for r in await asyncio.gather(*checks)]
    assert statuses == [429] * 20
    assert calls == 1


@pytest.mark.parametrize("fail_open", [False, True])
async def test_while_seeding_fails_the_failure_mode_applies(fail_open: bool) -> None:
    running, started = await start_sidecar(fail_open=fail_open)
    try:
        key = used_up_month(running.store)
        request = check_request(headers=bearer(key))
        real = running.store.period_totals

        async def ledger_down(
            workspace_id: str, since: datetime, until: datetime
        ) -> tuple[int, float]:
            raise StoreUnavailable("ledger locked")

        running.store.period_totals = ledger_down  # type: ignore[method-assign]
        for _ in range(3):
            if fail_open:
                response = await running.stub.Check(request)
                assert response.status.code == code_pb2.OK
                assert ok_upstream_headers(response)["x-authz-fail-open"] == "true"
            else:
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await running.stub.Check(request)
                assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        assert running.metrics.fail_open._value.get() == (3 if fail_open else 0)
        running.store.period_totals = real  # type: ignore[method-assign]
        assert status_of(await running.stub.Check(request)) == 429
    finally:
        await started.stop()


async def test_a_seed_that_hangs_is_bounded_by_the_database_timeout() -> None:
    running, started = await start_sidecar()
    try:
        key = used_up_month(running.store)

        async def hung(workspace_id: str, since: datetime, until: datetime) -> tuple[int, float]:
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        running.store.period_totals = hung  # type: ignore[method-assign]
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await running.stub.Check(check_request(headers=bearer(key)))
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await started.stop()
