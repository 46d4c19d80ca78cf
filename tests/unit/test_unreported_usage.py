"""Unknown usage is never free: an allowed request whose usage was not reported is charged its
reservation (or what its response bytes prove), to TPM, quota, spend and the ledger."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from google.rpc import code_pb2

from authz.keys import generate_key
from authz.models import ModelPrice, StreamingUsage
from authz.usage.accountant import UsageAccountant
from authz.usage.events import PROVEN_BYTES_PER_TOKEN, parse_entry
from authz.usage.pricing import PriceTable
from ratelimit.limiter import Limits, Quota
from ratelimit.memory import InMemoryRateLimiter
from tests.support.checks import bearer, check_request
from tests.support.fakes import FakeStore, workspace
from tests.unit.conftest import Sidecar
from tests.unit.test_usage import ALLOW, PRICED, accountant, entry

QUOTA = Quota(period="2026-11", token_quota=1_000_000, spend_cap_micros=None)
LIMITS = Limits(rpm=0, tpm=100)


@pytest.mark.parametrize(
    ("status", "body_bytes", "estimated"),
    [
        (200, 0, 70),  # a stream without include_usage: the reservation
        (200, 100 * PROVEN_BYTES_PER_TOKEN, 100),  # the bytes prove more than was reserved
        (0, 0, 70),  # the client hung up before any answer
        (429, 0, 0),  # an error answer generates nothing billable
        (503, 0, 0),
    ],
)
def test_unreported_usage_is_estimated(status: int, body_bytes: int, estimated: int) -> None:
    log = entry(ALLOW, None, status)
    log.response.response_body_bytes = body_bytes
    event = parse_entry(log)
    assert event is not None
    assert not event.reported
    assert (event.estimated_tokens, event.tokens_used) == (estimated, estimated)


def test_reported_usage_is_never_estimated() -> None:
    log = entry(ALLOW, {"prompt_tokens": 3, "completion_tokens": 4})
    log.response.response_body_bytes = 10**6
    event = parse_entry(log)
    assert event is not None
    assert (event.estimated_tokens, event.tokens_used) == (0, 7)


async def seventy_taken() -> tuple[FakeStore, InMemoryRateLimiter, UsageAccountant]:
    """A workspace at TPM 100 with 70 taken (by the request reported next, when it took its
    reservation), its month's counters at zero."""
    store = FakeStore()
    store.workspaces["ws_test"] = workspace(rpm=0, tpm=100)
    limiter = InMemoryRateLimiter(clock_ms=lambda: 0)
    books = accountant(store, limiter, PriceTable([ModelPrice("*", 1.0, 3.0)]))
    await limiter.seed_usage("ws_test", period="2026-11", tokens=0, spend_micros=0)
    assert (await limiter.acquire("ws_test", LIMITS, 70)).tokens.remaining == 30
    return store, limiter, books


async def test_an_unreported_stream_is_charged_to_tpm_quota_spend_and_ledger() -> None:
    store, limiter, books = await seventy_taken()
    event = parse_entry(entry(PRICED, {"model": "gpt"}))
    assert event is not None
    await books.record(event)
    after = await limiter.acquire("ws_test", LIMITS, 0, quota=QUOTA)
    assert after.tokens.remaining == 30  # nothing refunded
    assert after.quota is not None
    # Priced like a reservation: the split is unknown, so all at the higher (output) rate.
    assert (after.quota.tokens_used, after.quota.spend_used_micros) == (70, 210)
    await books.flush()
    (row,) = [r for batch in store.batches.values() for r in batch]
    assert (row.requests, row.prompt_tokens, row.completion_tokens) == (1, 0, 0)
    assert (row.estimated_requests, row.estimated_tokens, row.tokens) == (1, 70, 70)
    assert row.spend_usd == pytest.approx(210 / 1e6)


@pytest.mark.parametrize(
    ("policy", "body", "allowed"),
    [
        (StreamingUsage.REQUIRE, {"stream": True}, False),
        (
            StreamingUsage.REQUIRE,
            {"stream": True, "stream_options": {"include_usage": False}},
            False,
        ),
        (StreamingUsage.REQUIRE, {"stream": True, "stream_options": {"include_usage": True}}, True),
        (StreamingUsage.REQUIRE, {"stream": False}, True),
        (StreamingUsage.ESTIMATE, {"stream": True}, True),
    ],
)
async def test_require_policy_refuses_streams_that_will_not_report_usage(
    sidecar: Sidecar, policy: StreamingUsage, body: dict[str, object], allowed: bool
) -> None:
    key = generate_key()
    sidecar.store.add(key, replace(workspace(rpm=1), streaming_usage=policy))
    payload = json.dumps({"model": "gpt", "messages": [], **body}).encode()
    for _ in range(2):  # a refusal takes nothing from the buckets: rpm 1 still admits one
        response = await sidecar.stub.Check(check_request(headers=bearer(key), body=payload))
        if allowed:
            break
        assert response.denied_response.status.code == 400
        error = json.loads(response.denied_response.body)["error"]
        assert (error["code"], error["type"]) == ("stream_usage_required", "invalid_request_error")
        assert '"stream_options": {"include_usage": true}' in error["message"]
    if allowed:
        assert response.status.code == code_pb2.OK
    else:
        fixed = json.dumps({**json.loads(payload), "stream_options": {"include_usage": True}})
        response = await sidecar.stub.Check(check_request(headers=bearer(key), body=fixed.encode()))
        assert response.status.code == code_pb2.OK


UNTAKEN = {**PRICED, "reserved_tokens": 0, "estimate_tokens": 70, "took_from_buckets": False}
"""A shadow workspace's would-be denial, or a fail-open allow: it took nothing from the buckets."""


@pytest.mark.parametrize(
    ("claims", "usage", "body_bytes", "bucket", "charged", "estimated"),
    [
        # Took its 70: the difference from the reservation, refunded or charged (as debt).
        (PRICED, {"prompt_tokens": 10, "completion_tokens": 5}, 0, 85, 15, 0),
        (PRICED, {"prompt_tokens": 100, "completion_tokens": 50}, 0, -50, 150, 0),
        # Took nothing: the bucket is neither charged nor refunded, however much it used.
        (UNTAKEN, {"prompt_tokens": 100, "completion_tokens": 50}, 0, 30, 150, 0),
        # ...and unknown usage is still never free: the signed estimate, or what bytes prove.
        (UNTAKEN, None, 0, 30, 70, 70),
        (UNTAKEN, None, 100 * PROVEN_BYTES_PER_TOKEN, 30, 100, 100),
    ],
)
async def test_a_request_that_took_nothing_from_the_buckets_is_charged_only_to_the_month(
    claims: dict[str, object],
    usage: dict[str, object] | None,
    body_bytes: int,
    bucket: int,
    charged: int,
    estimated: int,
) -> None:
    store, limiter, books = await seventy_taken()
    log = entry(claims, usage)
    log.response.response_body_bytes = body_bytes
    event = parse_entry(log)
    assert event is not None
    await books.record(event)
    after = await limiter.acquire("ws_test", LIMITS, 0, quota=QUOTA)
    assert after.tokens.remaining == max(0, bucket)
    if bucket < 0:  # debt: not even a 1-token request fits until it is paid
        assert not (await limiter.acquire("ws_test", LIMITS, 1)).allowed
    assert after.quota is not None
    assert after.quota.tokens_used == charged
    await books.flush()
    (row,) = [r for batch in store.batches.values() for r in batch]
    assert (row.tokens, row.estimated_tokens) == (charged, estimated)
