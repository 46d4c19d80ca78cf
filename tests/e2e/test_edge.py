"""The shipped envoy.yaml as an internet-facing edge, through real Envoy (issues 17 and 20).

Hostile paths are canonical before routing, so none reaches the upstream without the
authorizer; headers with underscores are refused; and `make run`'s Envoy no longer warns that
downstream connections are unlimited.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import yaml

from tests.e2e.test_envoy_contract import auth, new_key
from tests.support.edge import SlowClientEnd, raw_request, slow_header_client
from tests.support.stack import ROOT, Stack

pytestmark = pytest.mark.e2e

# Each is /v1/models in disguise: dot segments (plain and percent-encoded), doubled slashes,
# and the key-management prefixes (whose routes skip ext_authz) walked back out of.
DISGUISED_MODELS = (
    "/keys/v1/../../v1/models",
    "//v1/models",
    "/v1//models",
    "/keys/v1/%2e%2e/%2e%2e/v1/models",
    "/keys/%2E%2E/v1/models",
    "/tokenfactory.keys.v1.KeyService/../v1/models",
    "/tokenfactory.keys.v1.KeyService/%2e%2e/v1/models",
)

# These resolve to /keys/v1/models: a key-management path the transcoder does not know, so the
# catch-all answers 404 itself; neither the authorizer nor the upstream is involved.
INTO_KEY_MANAGEMENT = ("/keys/v1/../v1/models", "/keys/v1/%2e%2e/v1/models", "//keys//v1/models")

# Encoded slashes: Envoy decodes them and redirects to the plain path instead of routing.
ENCODED_SLASHES = (
    "/v1%2Fmodels",
    "/keys/v1/..%2F..%2Fv1/models",
    "/tokenfactory.keys.v1.KeyService%2F..%2Fv1/models",
    "/v1%5Cmodels",
)


def edge_setting(name: str) -> Any:
    """A setting of the shipped envoy.yaml's HTTP connection manager."""
    config = yaml.safe_load((ROOT / "envoy.yaml").read_text(encoding="utf-8"))
    listener = config["static_resources"]["listeners"][0]
    return listener["filter_chains"][0]["filters"][0]["typed_config"][name]


def seconds(duration: str) -> float:
    return float(duration.removesuffix("s"))


def upstream_paths(stack: Stack) -> list[str]:
    return [str(r["path"]) for r in stack.upstream_requests()]


@pytest.mark.parametrize("path", DISGUISED_MODELS)
def test_a_disguised_path_without_a_key_meets_the_authorizer(
    embedded_stack: Stack, path: str
) -> None:
    before = len(upstream_paths(embedded_stack))
    answer = raw_request(embedded_stack.envoy_port, path)
    assert answer.status == 401, (path, answer)
    assert b"missing_api_key" in answer.body or b"invalid_api_key" in answer.body
    assert len(upstream_paths(embedded_stack)) == before


@pytest.mark.parametrize("path", DISGUISED_MODELS)
def test_a_disguised_path_with_a_key_reaches_the_upstream_as_the_canonical_path(
    embedded_stack: Stack, path: str
) -> None:
    _, key = new_key(embedded_stack)
    answer = raw_request(embedded_stack.envoy_port, path, headers=auth(key["secret"]))
    assert answer.status == 200, (path, answer)
    assert upstream_paths(embedded_stack)[-1] == "/v1/models"


@pytest.mark.parametrize("path", ENCODED_SLASHES)
def test_an_encoded_slash_is_redirected_to_the_plain_path_never_routed(
    embedded_stack: Stack, path: str
) -> None:
    before = len(upstream_paths(embedded_stack))
    answer = raw_request(embedded_stack.envoy_port, path)
    assert answer.status in {301, 302, 307, 308}, (path, answer)
    location = answer.headers["location"]
    assert "%2F" not in location.upper()
    assert "%5C" not in location.upper()
    assert len(upstream_paths(embedded_stack)) == before
    # Following the redirect meets the authorizer like any other request.
    target = location.split("://", 1)[-1]
    target = target[target.index("/") :]
    assert raw_request(embedded_stack.envoy_port, target).status == 401


@pytest.mark.parametrize("path", INTO_KEY_MANAGEMENT)
def test_a_path_resolving_into_key_management_is_refused_there(
    embedded_stack: Stack, path: str
) -> None:
    _, key = new_key(embedded_stack)
    before = len(upstream_paths(embedded_stack))
    answer = raw_request(embedded_stack.envoy_port, path, headers=auth(key["secret"]))
    assert answer.status == 404, (path, answer)
    assert b"no such key management endpoint" in answer.body
    assert len(upstream_paths(embedded_stack)) == before


def test_a_key_management_path_walked_out_of_never_skips_the_authorizer(
    embedded_stack: Stack,
) -> None:
    """Traversal out of the routes with ext_authz off: the chat route still checks the key."""
    before = len(upstream_paths(embedded_stack))
    for path in (
        "/keys/v1/../../v1/chat/completions",
        "/keys/v1/keys/%2e%2e/%2E%2E/%2e%2e/v1/chat/completions",
        "/tokenfactory.keys.v1.KeyService/../../v1/chat/completions",
    ):
        answer = raw_request(embedded_stack.envoy_port, path, method="POST", body=b"{}")
        assert answer.status == 401, (path, answer)
    # The other way round: into the key service's route, which goes to the sidecar (and its own
    # JWT check), never to the upstream.
    answer = raw_request(
        embedded_stack.envoy_port,
        "/v1/../tokenfactory.keys.v1.KeyService/ListKeys",
        method="POST",
        headers={"content-type": "application/grpc"},
        body=b"\0\0\0\0\0",
    )
    assert answer.headers.get("grpc-status") not in {None, "0"}, answer
    assert len(upstream_paths(embedded_stack)) == before


def test_a_header_with_underscores_is_rejected_before_the_upstream(
    embedded_stack: Stack,
) -> None:
    """x_workspace_id would become HTTP_X_WORKSPACE_ID beside the real header in a CGI app."""
    _, key = new_key(embedded_stack)
    before = len(upstream_paths(embedded_stack))
    smuggled = {**auth(key["secret"]), "x_workspace_id": "ws_VICTIM"}
    answer = raw_request(embedded_stack.envoy_port, "/v1/models", headers=smuggled)
    assert answer.status == 400
    assert len(upstream_paths(embedded_stack)) == before
    # The same request without the smuggled header is fine.
    assert (
        raw_request(embedded_stack.envoy_port, "/v1/models", headers=auth(key["secret"])).status
        == 200
    )


def test_envoy_does_not_warn_about_unlimited_downstream_connections(
    embedded_stack: Stack,
) -> None:
    assert raw_request(embedded_stack.envoy_port, "/v1/models").status == 401
    log = embedded_stack.envoy.read_log()
    assert "no configured limit" not in log


def test_slow_header_clients_are_cut_off_while_normal_traffic_gets_200(
    embedded_stack: Stack,
) -> None:
    """500 slowloris connections, one header byte a second: Envoy closes each at its request
    headers timeout (10 s) while a client with a key keeps getting 200."""
    _, key = new_key(embedded_stack, rpm=100_000)
    headers = auth(key["secret"])
    timeout = seconds(edge_setting("request_headers_timeout"))
    ceiling = timeout * 6  # generous: the machine is shared; the figure asserted is Envoy's own

    async def scenario() -> tuple[list[SlowClientEnd], list[int]]:
        slow = [
            asyncio.ensure_future(slow_header_client(embedded_stack.envoy_port, ceiling=ceiling))
            for _ in range(500)
        ]
        statuses: list[int] = []
        while not all(task.done() for task in slow):
            answer = await asyncio.to_thread(
                raw_request, embedded_stack.envoy_port, "/v1/models", headers=headers
            )
            statuses.append(answer.status)
        return await asyncio.gather(*slow), statuses

    ends, statuses = asyncio.run(scenario())
    assert len(ends) == 500
    # Each trickled at most as many bytes as it had seconds before Envoy's cut-off (plus the
    # machine's slack), never the whole header: Envoy closed it, the client did not finish.
    assert all(end.bytes_sent < 100_000 for end in ends)
    assert all(end.answer.startswith(b"HTTP/1.1 408") for end in ends)  # Envoy's timeout
    assert all(end.seconds >= timeout - 1 for end in ends)
    assert statuses
    assert set(statuses) == {200}
