"""Render a Check outcome (Allow or Deny) as Envoy's CheckResponse. Pure: no I/O, no clock.

Bodies are OpenAI-shaped JSON. Constant answers are built once and reused.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import lru_cache

from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.auth.v3.external_auth_pb2 import (
    CheckResponse,
    DeniedHttpResponse,
    OkHttpResponse,
)
from envoy.type.v3.http_status_pb2 import HttpStatus
from google.protobuf.internal.containers import RepeatedCompositeFieldContainer
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


_reset_value = lru_cache(maxsize=4096)(format_go_duration)
"""A reset is whole milliseconds within a window, so a few thousand values recur: each is
formatted once (formatting was an eighth of the rate headers' cost)."""


_REMAINING = {kind: f"x-ratelimit-remaining-{kind}" for kind in ("requests", "tokens")}
_RESET = {kind: f"x-ratelimit-reset-{kind}" for kind in ("requests", "tokens")}


def _add_bucket_headers(
    headers: RepeatedCompositeFieldContainer[HeaderValueOption], kind: str, bucket: BucketState
) -> None:
    if bucket.limit <= 0:
        return
    headers.append(_limit_header(kind, bucket.limit))
    # Filled in place: a message built apart and then copied in costs twice as much.
    remaining = headers.add(append_action=OVERWRITE).header
    remaining.key = _REMAINING[kind]
    remaining.value = str(max(0, bucket.remaining))
    reset = headers.add(append_action=OVERWRITE).header
    reset.key = _RESET[kind]
    reset.value = _reset_value(bucket.reset_seconds)


def add_rate_limit_headers(
    headers: RepeatedCompositeFieldContainer[HeaderValueOption], rate: LimitResult | None
) -> None:
    """OpenAI's six x-ratelimit-* headers (a bucket with no limit has none)."""
    if rate is None:
        return
    _add_bucket_headers(headers, "requests", rate.requests)
    _add_bucket_headers(headers, "tokens", rate.tokens)


MetadataValue = str | int | float | bool


def fill_metadata(metadata: Struct, fields: Mapping[str, MetadataValue]) -> None:
    """What `Struct.update` does for flat values, set in place: `update` walks every value
    through protobuf's Python helpers and cost 6 µs of each Check."""
    entries = metadata.fields
    for name, value in fields.items():
        # bool before int: bool is an int subclass, and Struct keeps them apart.
        if isinstance(value, str):
            entries[name].string_value = value
        elif isinstance(value, bool):
            entries[name].bool_value = value
        else:
            entries[name].number_value = value


def _metadata(**fields: MetadataValue) -> Struct:
    metadata = Struct()
    fill_metadata(metadata, fields)
    return metadata


def render_deny(deny: Deny) -> CheckResponse:
    grpc_code = code_pb2.UNAUTHENTICATED if deny.status == 401 else code_pb2.PERMISSION_DENIED
    fields: dict[str, MetadataValue] = {"decision": "deny", "code": deny.code, "type": deny.type}
    if deny.workspace_id is not None:
        fields["workspace_id"] = deny.workspace_id
    if deny.key_id is not None:
        fields["key_id"] = deny.key_id
    response = CheckResponse(
        status=status_pb2.Status(code=grpc_code, message=deny.code),
        denied_response=DeniedHttpResponse(
            status=HttpStatus(code=deny.status), body=error_body(deny)
        ),
        dynamic_metadata=_metadata(**fields),
    )
    headers = response.denied_response.headers
    headers.append(_JSON)
    if deny.status == 401:
        headers.append(_WWW_AUTHENTICATE)
    if deny.rate is not None:
        add_rate_limit_headers(headers, deny.rate)
        # Too large never fits, so no time is offered; a quota renews when the month turns.
        if not deny.rate.too_large:
            headers.append(_set("retry-after", retry_after_header(deny.rate.retry_after_seconds)))
    if not deny.should_retry:
        headers.append(_NO_RETRY)
    return response


_FAIL_OPEN = _set(FAIL_OPEN_HEADER, "true")


def render_shed(deny: Deny, *, retry_after_s: float) -> CheckResponse:
    """The answer to a Check shed under overload: built once, at start-up, and reused."""
    response = render_deny(deny)
    response.denied_response.headers.append(_set("retry-after", retry_after_header(retry_after_s)))
    response.dynamic_metadata.fields["decision"].string_value = "shed"
    return response


IDENTITY_CACHE_SIZE = 1024
"""Keys whose allow template stays cached. A template is the constant part of the key's allow
response, serialized: a few hundred bytes (built messages held 2 KB each in their upb arenas,
and a cache sized for every cached key, 100k, cost 200 MB of RSS). A key past it gets its
template built per request, which costs a few microseconds."""


class AllowRenderer:
    """Builds allow responses: what depends only on the key (its identity headers, the header
    removal list, most of the metadata) is rendered once per key and parsed back per request;
    only the per-request values (rate headers, reservation, signature) are added."""

    def __init__(
        self, *, keep_authorization: bool, identity_cache_size: int = IDENTITY_CACHE_SIZE
    ) -> None:
        # A client must never be able to claim fail-open or a shadow denial on its own.
        ours = [FAIL_OPEN_HEADER, SHADOW_DENY_HEADER]
        self._remove = ours if keep_authorization else ["authorization", *ours]
        self._template = lru_cache(maxsize=identity_cache_size)(self._build_template)

    def _build_template(self, workspace_id: str, key_id: str, mark: str | None) -> bytes:
        """The key's constant part: `mark` is None for a plain allow, "" for fail-open, else
        the shadow denial's `code:type`."""
        upstream = [_set(WORKSPACE_HEADER, workspace_id), _set(KEY_ID_HEADER, key_id)]
        remove = self._remove
        if mark == "":
            upstream.append(_FAIL_OPEN)
            remove = [h for h in remove if h != FAIL_OPEN_HEADER]
        elif mark is not None:
            upstream.append(_set(SHADOW_DENY_HEADER, mark))
            remove = [h for h in remove if h != SHADOW_DENY_HEADER]
        template: bytes = CheckResponse(
            status=_OK_STATUS,
            ok_response=OkHttpResponse(headers=upstream, headers_to_remove=remove),
            dynamic_metadata=_metadata(
                decision="allow",
                workspace_id=workspace_id,
                key_id=key_id,
                fail_open=mark == "",
            ),
        ).SerializeToString()
        return template

    def render(self, allow: Allow, signed: Signed | None = None) -> CheckResponse:
        """`signed`: the reservation's signature fields, added to the dynamic metadata."""
        mark = None
        if allow.fail_open:
            mark = ""
        elif allow.shadow_denial is not None:
            mark = f"{allow.shadow_denial.code}:{allow.shadow_denial.type}"
        response = CheckResponse.FromString(
            self._template(allow.workspace.id, allow.grant.key_id, mark)
        )
        ok = response.ok_response
        if allow.strip_headers:
            ok.headers_to_remove.extend(allow.strip_headers)
        add_rate_limit_headers(ok.response_headers_to_add, allow.rate)
        metadata = response.dynamic_metadata
        metadata.fields["reserved_tokens"].number_value = allow.reserved_tokens
        if signed is not None:
            fill_metadata(metadata, signed.metadata())
        return response
