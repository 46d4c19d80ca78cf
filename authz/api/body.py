"""A key API request's JSON body, read strictly: an unknown field is a 400 naming it.

Envoy's JSON transcoder drops body fields the proto does not know, so `{"lable": "x"}` would
reach the service as an empty label. The proto routes each body, untouched, into the request's
`json_body` (a google.api.HttpBody) instead, and this module applies it: only the fields the
HTTP API documents for that call are accepted (by proto or JSON name), with the protobuf JSON
mapping for their values. gRPC callers leave `json_body` unset and are not affected.
"""

from __future__ import annotations

import json
from typing import TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

from authz.store.common import InvalidInput
from authz.textsafe import printable

M = TypeVar("M", bound=Message)

BODY = "json_body"
_PATH_FIELDS = frozenset({"workspace_id", "key_id"})
"""Bound from the URL; a body may not restate them."""


def apply_json_body(request: M) -> M:
    """`request` with its JSON body's fields set, or InvalidInput naming what is wrong."""
    if not request.HasField(BODY):
        return request
    raw = getattr(request, BODY).data or b"{}"
    try:
        document = json.loads(raw)
    except ValueError:
        raise InvalidInput("the request body is not valid JSON") from None
    if not isinstance(document, dict):
        raise InvalidInput("the request body must be a JSON object")
    fields = [f for f in request.DESCRIPTOR.fields if f.name != BODY and f.name not in _PATH_FIELDS]
    names = {name: f.name for f in fields for name in (f.name, f.json_name)}
    for key in document:
        if key not in names:
            expected = ", ".join(f.name for f in fields) or "no fields"
            raise InvalidInput(
                f"unknown field {printable(key)!r} in the request body; expected: {expected}"
            )
    typed = type(request)()
    try:
        json_format.ParseDict({names[k]: v for k, v in document.items()}, typed)
    except json_format.ParseError as error:
        raise InvalidInput(f"bad request body: {printable(error)}") from None
    applied = type(request)()
    applied.CopyFrom(request)
    applied.ClearField(BODY)
    applied.MergeFrom(typed)
    return applied
