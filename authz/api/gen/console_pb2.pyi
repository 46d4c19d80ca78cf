import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListAuditRequest(_message.Message):
    __slots__ = ("workspace_id", "limit")
    WORKSPACE_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    workspace_id: str
    limit: int
    def __init__(self, workspace_id: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class AuditEntry(_message.Message):
    __slots__ = ("at", "key_id", "action", "actor_kind", "actor_subject", "actor_issuer", "detail")
    AT_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    ACTOR_KIND_FIELD_NUMBER: _ClassVar[int]
    ACTOR_SUBJECT_FIELD_NUMBER: _ClassVar[int]
    ACTOR_ISSUER_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    at: _timestamp_pb2.Timestamp
    key_id: str
    action: str
    actor_kind: str
    actor_subject: str
    actor_issuer: str
    detail: str
    def __init__(self, at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., key_id: _Optional[str] = ..., action: _Optional[str] = ..., actor_kind: _Optional[str] = ..., actor_subject: _Optional[str] = ..., actor_issuer: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class ListAuditResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[AuditEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[AuditEntry, _Mapping]]] = ...) -> None: ...

class GetObservationsRequest(_message.Message):
    __slots__ = ("workspace_id", "since", "until")
    WORKSPACE_ID_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    workspace_id: str
    since: _timestamp_pb2.Timestamp
    until: _timestamp_pb2.Timestamp
    def __init__(self, workspace_id: _Optional[str] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Latency(_message.Message):
    __slots__ = ("requests", "p50_ms", "p95_ms")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    P50_MS_FIELD_NUMBER: _ClassVar[int]
    P95_MS_FIELD_NUMBER: _ClassVar[int]
    requests: int
    p50_ms: float
    p95_ms: float
    def __init__(self, requests: _Optional[int] = ..., p50_ms: _Optional[float] = ..., p95_ms: _Optional[float] = ...) -> None: ...

class HourObservation(_message.Message):
    __slots__ = ("hour", "latency", "denials")
    class DenialsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    HOUR_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    DENIALS_FIELD_NUMBER: _ClassVar[int]
    hour: _timestamp_pb2.Timestamp
    latency: Latency
    denials: _containers.ScalarMap[str, int]
    def __init__(self, hour: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., latency: _Optional[_Union[Latency, _Mapping]] = ..., denials: _Optional[_Mapping[str, int]] = ...) -> None: ...

class KeyObservation(_message.Message):
    __slots__ = ("key_id", "latency", "denials")
    class DenialsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    DENIALS_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    latency: Latency
    denials: _containers.ScalarMap[str, int]
    def __init__(self, key_id: _Optional[str] = ..., latency: _Optional[_Union[Latency, _Mapping]] = ..., denials: _Optional[_Mapping[str, int]] = ...) -> None: ...

class GetObservationsResponse(_message.Message):
    __slots__ = ("hours", "keys", "total")
    HOURS_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    hours: _containers.RepeatedCompositeFieldContainer[HourObservation]
    keys: _containers.RepeatedCompositeFieldContainer[KeyObservation]
    total: Latency
    def __init__(self, hours: _Optional[_Iterable[_Union[HourObservation, _Mapping]]] = ..., keys: _Optional[_Iterable[_Union[KeyObservation, _Mapping]]] = ..., total: _Optional[_Union[Latency, _Mapping]] = ...) -> None: ...
