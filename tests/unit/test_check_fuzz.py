"""Arbitrary requests never break Check: always a well-formed CheckResponse, never an error."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc
from google.rpc import code_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authz.keys import find_keys, generate_key
from tests.support.checks import bearer, check_request
from tests.support.fakes import workspace
from tests.unit.conftest import start_sidecar

KNOWN_KEY = generate_key()


@pytest.fixture(scope="module")
def stub() -> Iterator[external_auth_pb2_grpc.AuthorizationStub]:
    """A sidecar on its own loop in a thread, so hypothesis can drive it synchronously."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    addresses: list[str] = []
    stop: list[asyncio.Event] = []

    async def main() -> None:
        stop.append(asyncio.Event())
        running, sidecar = await start_sidecar()
        running.store.add(KNOWN_KEY, workspace(rpm=1_000_000, tpm=1_000_000_000))
        addresses.append(running.address)
        started.set()
        await stop[0].wait()
        await sidecar.stop()

    thread = threading.Thread(target=lambda: loop.run_until_complete(main()), daemon=True)
    thread.start()
    assert started.wait(10)
    channel = grpc.insecure_channel(addresses[0])
    yield external_auth_pb2_grpc.AuthorizationStub(channel)
    channel.close()
    loop.call_soon_threadsafe(stop[0].set)
    thread.join(10)
    loop.close()


header_names = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=":"),
    min_size=1,
    max_size=30,
).map(str.lower)
header_values = st.one_of(
    st.text(max_size=300),
    st.builds(
        lambda k, s: f"{s} {k}", st.sampled_from([KNOWN_KEY, generate_key()]), st.text(max_size=10)
    ),
    st.just("Bearer " + KNOWN_KEY),
    st.just("Bearer sk-oais_" + "A" * 46),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    path=st.one_of(st.text(max_size=200), st.just("/v1/chat/completions")).map(lambda p: "/" + p),
    headers=st.dictionaries(
        st.one_of(header_names, st.sampled_from(["authorization", "content-length"])),
        header_values,
        max_size=8,
    ),
    body=st.one_of(
        st.binary(max_size=2000),
        st.builds(
            lambda n, extra: json.dumps({"max_tokens": n, **extra}).encode(),
            st.one_of(st.integers(), st.floats(allow_nan=True), st.text(max_size=5), st.none()),
            st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
        ),
    ),
)
def test_any_request_gets_a_well_formed_answer(
    stub: external_auth_pb2_grpc.AuthorizationStub,
    path: str,
    headers: dict[str, str],
    body: bytes,
) -> None:
    response = stub.Check(check_request(path=path, headers=headers, body=body), timeout=5)
    if response.status.code == code_pb2.OK:
        assert response.HasField("ok_response")
        values = {h.header.key: h.header.value for h in response.ok_response.headers}
        assert values["x-workspace-id"] == "ws_test"
    else:
        assert response.HasField("denied_response")
        assert response.denied_response.status.code in {400, 401, 429}
        parsed = json.loads(response.denied_response.body)
        assert set(parsed["error"]) == {"message", "type", "param", "code"}
        # No well-formed key ever comes back in a body, whatever was sent.
        assert find_keys(response.denied_response.body) == []


def test_known_key_allowed(stub: external_auth_pb2_grpc.AuthorizationStub) -> None:
    response = stub.Check(check_request(headers=bearer(KNOWN_KEY)), timeout=5)
    assert response.status.code == code_pb2.OK
