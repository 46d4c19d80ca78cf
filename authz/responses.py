"""Render a Check outcome (Allow or Deny) as Envoy's CheckResponse. Pure: no I/O, no clock.

Bodies are OpenAI-shaped JSON. Constant answers are built once and reused.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import lru_cache

from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.auth.v3.external_auth_pb2 import (
    CheckResponse,
    DeniedHttpResponse,
    OkHttpResponse,
)
from envoy.type.v3.http_status_pb2 import HttpStatus
from google.protobuf.struct_pb2 import Struct
from google.rpc import code_pb2, status_pb2

from authz.decision import Allow, Deny
from authz.usage.reservations import Signed
from ratelimit.durations import format_go_duration, retry_after_header
from ratelimit.limiter import BucketState, LimitResult

OVERWRITE = HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
WORKSPACE_HEADER = "x-workspace-id"
KEY_ID_HEADER = "x-api-key-id"
FAIL_OPEN_HEADER = "x-authz-fail-open"
SHADOW_DENY_HEADER = "x-authz-shadow-deny"
_JSON = HeaderValueOption(header=HeaderValue(key="content-type", value="application/json"))
_WWW_AUTHENTICATE = HeaderValueOption(header=HeaderValue(key="www-authenticate", value="Bearer"))
_OK_STATUS = status_pb2.Status(code=code_pb2.OK)
_NO_RETRY = HeaderValueOption(header=HeaderValue(key="x-should-retry", value="false"))


def error_body(deny: Deny) -> str:
    """`{"error": {"message", "type", "param": null, "code"}}`, as OpenAI sends it."""
    return json.dumps(
        {"error": {"message": deny.message, "type": deny.type, "param": None, "code": deny.code}}
    )


def _set(key: str, value: str) -> HeaderValueOption:
    return HeaderValueOption(header=HeaderValue(key=key, value=value), append_action=OVERWRITE)


@lru_cache(maxsize=4096)
def _limit_header(kind: str, limit: int) -> HeaderValueOption:
    # A workspace's limit rarely changes: build its header once, not per request.
    return _set(f"x-ratelimit-limit-{kind}", str(limit))


def _bucket_headers(kind: str, bucket: BucketState) -> Iterable[HeaderValueOption]:
    if bucket.limit <= 0:
        return ()
    return (
        _limit_header(kind, bucket.limit),
        _set(f"x-ratelimit-remaining-{kind}", str(max(0, bucket.remaining))),
        _set(f"x-ratelimit-reset-{kind}", format_go_duration(bucket.reset_seconds)),
    )


def rate_limit_headers(rate: LimitResult | None) -> list[HeaderValueOption]:
    """OpenAI's six x-ratelimit-* headers (a bucket with no limit has none)."""
    if rate is None:
        return []
    return [*_bucket_headers("requests", rate.requests), *_bucket_headers("tokens", rate.tokens)]


def _metadata(**fields: str | int | float | bool) -> Struct:
    metadata = Struct()
    metadata.update(fields)
    return metadata


def render_deny(deny: Deny) -> CheckResponse:
    headers = [_JSON]
    if deny.status == 401:
        headers.append(_WWW_AUTHENTICATE)
    if deny.rate is not None:
        headers.extend(rate_limit_headers(deny.rate))
        # Too large never fits, so no time is offered; a quota renews when the month turns.
        if not deny.rate.too_large:
            headers.append(_set("retry-after", retry_after_header(deny.rate.retry_after_seconds)))
    if not deny.should_retry:
        headers.append(_NO_RETRY)
    grpc_code = code_pb2.UNAUTHENTICATED if deny.status == 401 else code_pb2.PERMISSION_DENIED
    fields: dict[str, str | int | bool] = {"decision": "deny", "code": deny.code, "type": deny.type}
    if deny.workspace_id is not None:
        fields["workspace_id"] = deny.workspace_id
    if deny.key_id is not None:
        fields["key_id"] = deny.key_id
    return CheckResponse(
        status=status_pb2.Status(code=grpc_code, message=deny.code),
        denied_response=DeniedHttpResponse(
            status=HttpStatus(code=deny.status),
            headers=headers,
            body=error_body(deny),
        ),
        dynamic_metadata=_metadata(**fields),
    )


def _identity_headers(workspace_id: str, key_id: str) -> tuple[HeaderValueOption, ...]:
    return (_set(WORKSPACE_HEADER, workspace_id), _set(KEY_ID_HEADER, key_id))


_FAIL_OPEN = _set(FAIL_OPEN_HEADER, "true")


IDENTITY_CACHE_SIZE = 1024
"""Keys whose identity headers stay built. Each entry holds two protobuf messages, about 2 KB
in their upb arenas: a cache sized for every cached key (100k) cost 200 MB of RSS, so only the
busiest keys keep theirs; the rest are built per request, which costs a few microseconds."""


class AllowRenderer:
    """Builds allow responses; the header removal list is fixed at start-up."""

    def __init__(
        self, *, keep_authorization: bool, identity_cache_size: int = IDENTITY_CACHE_SIZE
    ) -> None:
        # The identity headers depend only on the key: the busiest keys' are built once.
        self._identity = lru_cache(maxsize=identity_cache_size)(_identity_headers)
        # A client must never be able to claim fail-open or a shadow denial on its own.
        ours = [FAIL_OPEN_HEADER, SHADOW_DENY_HEADER]
        self._remove = ours if keep_authorization else ["authorization", *ours]
        self._remove_fail_open = [h for h in self._remove if h != FAIL_OPEN_HEADER]
        self._remove_shadow = [h for h in self._remove if h != SHADOW_DENY_HEADER]

    def render(self, allow: Allow, signed: Signed | None = None) -> CheckResponse:
        """`signed`: the reservation's signature fields, added to the dynamic metadata."""
        upstream = self._identity(allow.workspace.id, allow.grant.key_id)
        remove = self._remove
        if allow.fail_open:
            upstream = (*upstream, _FAIL_OPEN)
            remove = self._remove_fail_open
        elif allow.shadow_denial is not None:
            mark = f"{allow.shadow_denial.code}:{allow.shadow_denial.type}"
            upstream = (*upstream, _set(SHADOW_DENY_HEADER, mark))
            remove = self._remove_shadow
        if allow.strip_headers:
            remove = [*remove, *allow.strip_headers]
        return CheckResponse(
            status=_OK_STATUS,
            ok_response=OkHttpResponse(
                headers=upstream,
                headers_to_remove=remove,
                response_headers_to_add=rate_limit_headers(allow.rate),
            ),
            dynamic_metadata=_metadata(
                decision="allow",
                workspace_id=allow.workspace.id,
                key_id=allow.grant.key_id,
                reserved_tokens=allow.reserved_tokens,
                fail_open=allow.fail_open,
                **(signed.metadata() if signed is not None else {}),
            ),
        )
