"""Build ext_authz CheckRequests the way Envoy sends them."""

from __future__ import annotations

from collections.abc import Mapping

from envoy.service.auth.v3.attribute_context_pb2 import AttributeContext
from envoy.service.auth.v3.external_auth_pb2 import CheckRequest, CheckResponse


def check_request(
    *,
    path: str = "/v1/chat/completions",
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
    method: str = "POST",
) -> CheckRequest:
    all_headers = {":path": path, ":method": method, **(headers or {})}
    return CheckRequest(
        attributes=AttributeContext(
            request=AttributeContext.Request(
                http=AttributeContext.HttpRequest(
                    method=method, path=path, headers=all_headers, raw_body=body
                )
            )
        )
    )


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def denied_headers(response: CheckResponse) -> dict[str, str]:
    return {h.header.key: h.header.value for h in response.denied_response.headers}


def ok_upstream_headers(response: CheckResponse) -> dict[str, str]:
    return {h.header.key: h.header.value for h in response.ok_response.headers}


def ok_client_headers(response: CheckResponse) -> dict[str, str]:
    return {h.header.key: h.header.value for h in response.ok_response.response_headers_to_add}
