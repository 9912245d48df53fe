from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetRequest(_message.Message):
    __slots__ = ("cache", "key", "reserve")
    CACHE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    RESERVE_FIELD_NUMBER: _ClassVar[int]
    cache: str
    key: str
    reserve: bool
    def __init__(self, cache: _Optional[str] = ..., key: _Optional[str] = ..., reserve: _Optional[bool] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("found", "value", "tags", "version", "ttl_ms", "reservation")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_FIELD_NUMBER: _ClassVar[int]
    found: bool
    value: bytes
    tags: _containers.RepeatedScalarFieldContainer[str]
    version: int
    ttl_ms: int
    reservation: str
    def __init__(self, found: _Optional[bool] = ..., value: _Optional[bytes] = ..., tags: _Optional[_Iterable[str]] = ..., version: _Optional[int] = ..., ttl_ms: _Optional[int] = ..., reservation: _Optional[str] = ...) -> None: ...

class GetManyRequest(_message.Message):
    __slots__ = ("cache", "keys", "reserve")
    CACHE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    RESERVE_FIELD_NUMBER: _ClassVar[int]
    cache: str
    keys: _containers.RepeatedScalarFieldContainer[str]
    reserve: bool
    def __init__(self, cache: _Optional[str] = ..., keys: _Optional[_Iterable[str]] = ..., reserve: _Optional[bool] = ...) -> None: ...

class GetManyResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[GetResponse]
    def __init__(self, entries: _Optional[_Iterable[_Union[GetResponse, _Mapping]]] = ...) -> None: ...

class SetRequest(_message.Message):
    __slots__ = ("cache", "key", "value", "tags", "version", "ttl_ms", "reservation", "reason")
    CACHE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    cache: str
    key: str
    value: bytes
    tags: _containers.RepeatedScalarFieldContainer[str]
    version: int
    ttl_ms: int
    reservation: str
    reason: str
    def __init__(self, cache: _Optional[str] = ..., key: _Optional[str] = ..., value: _Optional[bytes] = ..., tags: _Optional[_Iterable[str]] = ..., version: _Optional[int] = ..., ttl_ms: _Optional[int] = ..., reservation: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class SetResponse(_message.Message):
    __slots__ = ("stored", "seq")
    STORED_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    stored: bool
    seq: int
    def __init__(self, stored: _Optional[bool] = ..., seq: _Optional[int] = ...) -> None: ...

class SetManyRequest(_message.Message):
    __slots__ = ("cache", "entries")
    CACHE_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    cache: str
    entries: _containers.RepeatedCompositeFieldContainer[SetRequest]
    def __init__(self, cache: _Optional[str] = ..., entries: _Optional[_Iterable[_Union[SetRequest, _Mapping]]] = ...) -> None: ...

class SetManyResponse(_message.Message):
    __slots__ = ("stored",)
    STORED_FIELD_NUMBER: _ClassVar[int]
    stored: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, stored: _Optional[_Iterable[bool]] = ...) -> None: ...

class AddResponse(_message.Message):
    __slots__ = ("added", "stored")
    ADDED_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    added: bool
    stored: bool
    def __init__(self, added: _Optional[bool] = ..., stored: _Optional[bool] = ...) -> None: ...

class IncrRequest(_message.Message):
    __slots__ = ("cache", "key", "delta")
    CACHE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    cache: str
    key: str
    delta: int
    def __init__(self, cache: _Optional[str] = ..., key: _Optional[str] = ..., delta: _Optional[int] = ...) -> None: ...

class IncrResponse(_message.Message):
    __slots__ = ("value", "stored")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    value: int
    stored: bool
    def __init__(self, value: _Optional[int] = ..., stored: _Optional[bool] = ...) -> None: ...

class TouchRequest(_message.Message):
    __slots__ = ("cache", "key", "ttl_ms")
    CACHE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    cache: str
    key: str
    ttl_ms: int
    def __init__(self, cache: _Optional[str] = ..., key: _Optional[str] = ..., ttl_ms: _Optional[int] = ...) -> None: ...

class TouchResponse(_message.Message):
    __slots__ = ("touched",)
    TOUCHED_FIELD_NUMBER: _ClassVar[int]
    touched: bool
    def __init__(self, touched: _Optional[bool] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("cache", "keys", "reason")
    CACHE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    cache: str
    keys: _containers.RepeatedScalarFieldContainer[str]
    reason: str
    def __init__(self, cache: _Optional[str] = ..., keys: _Optional[_Iterable[str]] = ..., reason: _Optional[str] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("existed",)
    EXISTED_FIELD_NUMBER: _ClassVar[int]
    existed: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, existed: _Optional[_Iterable[bool]] = ...) -> None: ...

class GetOrReserveResponse(_message.Message):
    __slots__ = ("found", "value", "reservation", "tags", "version", "ttl_ms")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    found: bool
    value: bytes
    reservation: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    version: int
    ttl_ms: int
    def __init__(self, found: _Optional[bool] = ..., value: _Optional[bytes] = ..., reservation: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ..., version: _Optional[int] = ..., ttl_ms: _Optional[int] = ...) -> None: ...

class FillRequest(_message.Message):
    __slots__ = ("reservation", "value", "tags", "version", "ttl_ms")
    RESERVATION_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    reservation: str
    value: bytes
    tags: _containers.RepeatedScalarFieldContainer[str]
    version: int
    ttl_ms: int
    def __init__(self, reservation: _Optional[str] = ..., value: _Optional[bytes] = ..., tags: _Optional[_Iterable[str]] = ..., version: _Optional[int] = ..., ttl_ms: _Optional[int] = ...) -> None: ...

class InvalidateKeyRequest(_message.Message):
    __slots__ = ("cache", "key", "version", "reason")
    CACHE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    cache: str
    key: str
    version: int
    reason: str
    def __init__(self, cache: _Optional[str] = ..., key: _Optional[str] = ..., version: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class InvalidateTagRequest(_message.Message):
    __slots__ = ("cache", "tag", "reason")
    CACHE_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    cache: str
    tag: str
    reason: str
    def __init__(self, cache: _Optional[str] = ..., tag: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class InvalidatePrefixRequest(_message.Message):
    __slots__ = ("cache", "prefix", "reason")
    CACHE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    cache: str
    prefix: str
    reason: str
    def __init__(self, cache: _Optional[str] = ..., prefix: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class InvalidateAllRequest(_message.Message):
    __slots__ = ("cache", "reason")
    CACHE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    cache: str
    reason: str
    def __init__(self, cache: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class InvalidateResponse(_message.Message):
    __slots__ = ("seq",)
    SEQ_FIELD_NUMBER: _ClassVar[int]
    seq: int
    def __init__(self, seq: _Optional[int] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("cache",)
    CACHE_FIELD_NUMBER: _ClassVar[int]
    cache: str
    def __init__(self, cache: _Optional[str] = ...) -> None: ...

class WatchEvent(_message.Message):
    __slots__ = ("keepalive", "invalidated", "flushed", "not_serving")
    KEEPALIVE_FIELD_NUMBER: _ClassVar[int]
    INVALIDATED_FIELD_NUMBER: _ClassVar[int]
    FLUSHED_FIELD_NUMBER: _ClassVar[int]
    NOT_SERVING_FIELD_NUMBER: _ClassVar[int]
    keepalive: Keepalive
    invalidated: Invalidations
    flushed: bool
    not_serving: bool
    def __init__(self, keepalive: _Optional[_Union[Keepalive, _Mapping]] = ..., invalidated: _Optional[_Union[Invalidations, _Mapping]] = ..., flushed: _Optional[bool] = ..., not_serving: _Optional[bool] = ...) -> None: ...

class Keepalive(_message.Message):
    __slots__ = ("vouched_for_ms",)
    VOUCHED_FOR_MS_FIELD_NUMBER: _ClassVar[int]
    vouched_for_ms: int
    def __init__(self, vouched_for_ms: _Optional[int] = ...) -> None: ...

class Invalidations(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Invalidated]
    def __init__(self, items: _Optional[_Iterable[_Union[Invalidated, _Mapping]]] = ...) -> None: ...

class Invalidated(_message.Message):
    __slots__ = ("key", "tag", "prefix", "all", "version")
    KEY_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    key: str
    tag: str
    prefix: str
    all: bool
    version: int
    def __init__(self, key: _Optional[str] = ..., tag: _Optional[str] = ..., prefix: _Optional[str] = ..., all: _Optional[bool] = ..., version: _Optional[int] = ...) -> None: ...
