"""One access-log entry from Envoy, reduced to what accounting needs. Pure: no I/O.

Envoy's `http_grpc` access logger sends the stream's dynamic metadata: the ext_authz namespace
(written by our Check: workspace, key, reserved tokens, the estimate) and `oais.usage` (written
by Envoy's `json_to_metadata` / `sse_to_metadata` filters from the upstream's `usage` object).

The ext_authz namespace also carries the signed reservation (authz/usage/reservations.py):
nothing here is trusted until the access-log service has verified it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from envoy.data.accesslog.v3.accesslog_pb2 import HTTPAccessLogEntry
from google.protobuf.duration_pb2 import Duration
from google.protobuf.internal.containers import MessageMap
from google.protobuf.struct_pb2 import Struct, Value
from google.protobuf.timestamp_pb2 import Timestamp

from authz.models import ModelPrice
from authz.usage import reservations as rsv

EXT_AUTHZ_NAMESPACE = "envoy.filters.http.ext_authz"
USAGE_NAMESPACE = "oais.usage"
UNKNOWN_MODEL = "unknown"
INVALID_TEXT = "(invalid)"
"""What a response's string becomes when it is not printable or too long: a NUL, a control
character or a megabyte of model name never reaches the ledger, a log line or a terminal."""
MAX_TEXT = 128
_MAX_TOKENS = 10**12
_NO_FIELDS = Struct().fields
PROVEN_BYTES_PER_TOKEN = 400
"""A response of N body bytes carried at least N // 400 tokens: no SSE chunk or JSON choice that
holds a token is longer than this (OpenAI's are about 150-250 bytes), so a hung-up stream's bytes
prove a floor on what it generated, never more than it did."""


@dataclass(frozen=True, slots=True)
class UsageEvent:
    """An allowed request as Envoy finished it.

    `model` is the ledger's model: the one the client asked for (`claims.model`), or the
    response's when the request named none. `response_model` is what the upstream answered
    (e.g. a dated `gpt-4o-2024-08-06`), for reports; it never prices anything.
    """

    workspace_id: str
    key_id: str
    reserved_tokens: int
    model: str
    prompt_tokens: int | None
    completion_tokens: int | None
    status: int
    started_at: datetime
    upstream_seconds: float | None
    response_bytes: int = 0
    rejected: tuple[str, ...] = ()
    """Names of the response's fields replaced by INVALID_TEXT."""
    claims: rsv.Claims | None = None
    """The reservation as the entry states it (None: unsigned); checked against `mac`."""
    signing_key: str = ""
    mac: str = ""
    response_model: str | None = None
    latency_seconds: float | None = None
    """Start to the last byte sent downstream: the latency the client saw (None: it went away
    before an answer)."""

    @property
    def reported(self) -> bool:
        """The upstream reported usage (JSON body or the final SSE chunk)."""
        return self.prompt_tokens is not None or self.completion_tokens is not None

    @property
    def took_from_buckets(self) -> bool:
        """False for a shadow workspace's would-be denial and a fail-open allow (signed so)."""
        return self.claims is None or self.claims.took_from_buckets

    @property
    def estimated_tokens(self) -> int:
        """Tokens charged by estimate: 0 when the upstream reported usage, or answered with an
        error (4xx/5xx, which generates nothing billable). Otherwise unknown usage is never free:
        the Check-time estimate (the reservation, or what a request that took nothing from the
        buckets would have reserved), or more when the response's bytes prove more (a stream
        without `include_usage`, or a client that hung up before the final chunk)."""
        if self.reported or 400 <= self.status < 600:
            return 0
        estimate = self.reserved_tokens if self.claims is None else self.claims.estimate
        return max(estimate, self.response_bytes // PROVEN_BYTES_PER_TOKEN)

    @property
    def bucket_delta(self) -> int:
        """What the TPM bucket is charged (negative: refunded) once the usage is known: the
        difference from the reservation. A request that took nothing from the buckets changes
        nothing there: under enforcement it would not have run (shadow), or the buckets were
        not asked (fail-open), and a charge would only be debt for requests never admitted.
        Its usage still counts in full toward the month, spend and the ledger."""
        return self.tokens_used - self.reserved_tokens if self.took_from_buckets else 0

    @property
    def price(self) -> ModelPrice | None:
        """The requested model's price at Check time, as the verified reservation carries it."""
        return None if self.claims is None else self.claims.price

    @property
    def tokens_used(self) -> int:
        """Every token charged: what the upstream reported, else the estimate."""
        reported = (self.prompt_tokens or 0) + (self.completion_tokens or 0)
        return reported + self.estimated_tokens


Fields = MessageMap[str, Value]
"""A Struct's fields, read directly: a field is looked up once, and its kind tested once."""


def _amount(fields: Fields, name: str) -> float | None:
    """A finite, non-negative number field, else None."""
    value = fields.get(name)
    if value is None:
        return None
    number: float = value.number_value
    # Only a number holds a non-zero number_value: the kind needs testing for 0 alone.
    if number == 0 and not value.HasField("number_value"):
        return None
    return number if 0 <= number < math.inf else None  # NaN fails both


def _count(fields: Fields, name: str) -> int | None:
    number = _amount(fields, name)
    return None if number is None else min(int(number), _MAX_TOKENS)


def _raw_text(fields: Fields, name: str) -> str | None:
    value = fields.get(name)
    # Any other kind reads as "": absent, as an empty string is.
    return None if value is None else value.string_value or None


def valid_text(text: str) -> bool:
    """Printable (no NUL, control, separator or bidi character) and at most MAX_TEXT long."""
    return len(text) <= MAX_TEXT and text.isprintable()


def _text(fields: Fields, name: str) -> str | None:
    """Our own metadata: a string that is not valid counts as absent."""
    text = _raw_text(fields, name)
    return text if text is not None and valid_text(text) else None


_RESOURCE_SEGMENT = re.compile(r"[a-z_]+")


def resource_of(path: str) -> str:
    """What the ledger files a response without a model under: the path's resource, e.g.
    `/v1/models`, `/v1/chat/completions`, `/v1/files` for `/v1/files/file-abc?x=1` (ids are cut
    off, so each file does not get a ledger row of its own); `unknown` without a path."""
    segments = path.partition("?")[0].split("/")[1:]
    kept: list[str] = []
    for segment in segments:
        if _RESOURCE_SEGMENT.fullmatch(segment) is None and not (segment == "v1" and not kept):
            break
        kept.append(segment)
    return "/" + "/".join(kept) if kept else UNKNOWN_MODEL


def _flag(fields: Fields, name: str, absent: bool) -> bool | None:
    """A bool field; `absent` when missing; None when it holds anything but a bool."""
    value = fields.get(name)
    if value is None:
        return absent
    if value.bool_value:  # only a bool holds True
        return True
    return False if value.HasField("bool_value") else None


def _claims(authz: Fields, workspace_id: str, key_id: str, reserved: int) -> rsv.Claims | None:
    reservation_id = _text(authz, rsv.ID_FIELD)
    reserved_at = _count(authz, rsv.TIME_FIELD)
    price_in = _amount(authz, rsv.PRICE_IN_FIELD)
    price_out = _amount(authz, rsv.PRICE_OUT_FIELD)
    if reservation_id is None or reserved_at is None or price_in is None or price_out is None:
        return None
    # Absent in an older replica's entries, which took what they reserved (v1 claims).
    took = _flag(authz, rsv.TOOK_FIELD, absent=True)
    if took is None:
        return None
    return rsv.Claims(
        reservation_id=reservation_id,
        workspace_id=workspace_id,
        key_id=key_id,
        reserved_tokens=reserved,
        reserved_at=reserved_at,
        model=(_raw_text(authz, rsv.MODEL_FIELD) or "")[: rsv.TEXT_LIMIT],
        price_in=price_in,
        price_out=price_out,
        estimate_tokens=_count(authz, rsv.ESTIMATE_FIELD),
        took_from_buckets=took,
    )


def _seconds(duration: Duration) -> float:
    return duration.seconds + duration.nanos / 1e9


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _moment(timestamp: Timestamp) -> datetime:
    """`Timestamp.ToDatetime(tzinfo=UTC)`, the same value, without its generic conversions."""
    nanos = timestamp.nanos
    micros = nanos // 1000 if nanos >= 0 else -(-nanos // 1000)  # toward zero, as it does
    return _EPOCH + timedelta(0, timestamp.seconds, micros)  # positional: no keyword parsing


def parse_entry(entry: HTTPAccessLogEntry) -> UsageEvent | None:
    """The usage event for an entry our Check allowed, else None (denied, or not ours)."""
    common = entry.common_properties
    metadata = common.metadata.filter_metadata
    namespace = metadata.get(EXT_AUTHZ_NAMESPACE)
    if namespace is None:
        return None
    authz = namespace.fields
    if _raw_text(authz, "decision") != "allow":  # "allow" is valid text
        return None
    workspace_id = _text(authz, "workspace_id")
    key_id = _text(authz, "key_id")
    if workspace_id is None or key_id is None:
        return None
    reported = metadata.get(USAGE_NAMESPACE)
    usage = _NO_FIELDS if reported is None else reported.fields
    upstream: float | None = None
    if common.HasField("time_to_first_upstream_tx_byte") and common.HasField(
        "time_to_last_upstream_rx_byte"
    ):
        upstream = max(
            0.0,
            _seconds(common.time_to_last_upstream_rx_byte)
            - _seconds(common.time_to_first_upstream_tx_byte),
        )
    latency = (
        _seconds(common.time_to_last_downstream_tx_byte)
        if common.HasField("time_to_last_downstream_tx_byte")
        else None
    )
    reserved = _count(authz, "reserved_tokens") or 0
    claims = _claims(authz, workspace_id, key_id, reserved)
    # The ledger files the model the client asked for (signed into the reservation), else the
    # one the response names, else the path's resource. Both come from outside: each must be
    # printable text, else it is replaced and counted (a NUL would stop PostgreSQL's ledger).
    rejected: tuple[str, ...] = ()
    response_model = _raw_text(usage, "model")
    if response_model is not None and not valid_text(response_model):
        response_model = INVALID_TEXT
        rejected = ("model",)
    requested = claims.model if claims else None
    if requested and not valid_text(requested):
        requested = INVALID_TEXT
        rejected = (*rejected, "requested_model")
    model = requested or response_model or resource_of(entry.request.path)
    response = entry.response
    return UsageEvent(
        workspace_id=workspace_id,
        key_id=key_id,
        reserved_tokens=reserved,
        model=model,
        prompt_tokens=_count(usage, "prompt_tokens"),
        completion_tokens=_count(usage, "completion_tokens"),
        status=response.response_code.value,
        started_at=_moment(common.start_time),
        upstream_seconds=upstream,
        response_bytes=min(response.response_body_bytes, _MAX_TOKENS),
        rejected=rejected,
        claims=claims,
        signing_key=_text(authz, rsv.KID_FIELD) or "",
        mac=_text(authz, rsv.MAC_FIELD) or "",
        response_model=response_model,
        latency_seconds=latency,
    )
