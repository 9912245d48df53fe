from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Signed(_message.Message):
    __slots__ = ("body", "signer", "signature", "digests", "index")
    BODY_FIELD_NUMBER: _ClassVar[int]
    SIGNER_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    body: bytes
    signer: str
    signature: bytes
    digests: bytes
    index: int
    def __init__(self, body: _Optional[bytes] = ..., signer: _Optional[str] = ..., signature: _Optional[bytes] = ..., digests: _Optional[bytes] = ..., index: _Optional[int] = ...) -> None: ...

class InvalidationBatch(_message.Message):
    __slots__ = ("origin", "epoch", "seq", "timestamp_us", "invalidations", "namespace", "actor")
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_US_FIELD_NUMBER: _ClassVar[int]
    INVALIDATIONS_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    origin: str
    epoch: int
    seq: int
    timestamp_us: int
    invalidations: _containers.RepeatedCompositeFieldContainer[Invalidation]
    namespace: str
    actor: str
    def __init__(self, origin: _Optional[str] = ..., epoch: _Optional[int] = ..., seq: _Optional[int] = ..., timestamp_us: _Optional[int] = ..., invalidations: _Optional[_Iterable[_Union[Invalidation, _Mapping]]] = ..., namespace: _Optional[str] = ..., actor: _Optional[str] = ...) -> None: ...

class Invalidation(_message.Message):
    __slots__ = ("cache", "key", "tag", "prefix", "all", "version", "reason", "actor", "purge_id")
    CACHE_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    PURGE_ID_FIELD_NUMBER: _ClassVar[int]
    cache: str
    key: str
    tag: str
    prefix: str
    all: bool
    version: int
    reason: str
    actor: str
    purge_id: str
    def __init__(self, cache: _Optional[str] = ..., key: _Optional[str] = ..., tag: _Optional[str] = ..., prefix: _Optional[str] = ..., all: _Optional[bool] = ..., version: _Optional[int] = ..., reason: _Optional[str] = ..., actor: _Optional[str] = ..., purge_id: _Optional[str] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("origin", "epoch", "last_seq", "timestamp_us", "address", "caches", "namespace", "writes_receipts", "beat")
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_US_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CACHES_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    WRITES_RECEIPTS_FIELD_NUMBER: _ClassVar[int]
    BEAT_FIELD_NUMBER: _ClassVar[int]
    origin: str
    epoch: int
    last_seq: int
    timestamp_us: int
    address: str
    caches: _containers.RepeatedCompositeFieldContainer[CacheSize]
    namespace: str
    writes_receipts: bool
    beat: int
    def __init__(self, origin: _Optional[str] = ..., epoch: _Optional[int] = ..., last_seq: _Optional[int] = ..., timestamp_us: _Optional[int] = ..., address: _Optional[str] = ..., caches: _Optional[_Iterable[_Union[CacheSize, _Mapping]]] = ..., namespace: _Optional[str] = ..., writes_receipts: _Optional[bool] = ..., beat: _Optional[int] = ...) -> None: ...

class CacheSize(_message.Message):
    __slots__ = ("name", "entries")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    name: str
    entries: int
    def __init__(self, name: _Optional[str] = ..., entries: _Optional[int] = ...) -> None: ...

class Receipt(_message.Message):
    __slots__ = ("node", "origin", "epoch", "seq", "published_us", "applied_us", "dropped", "flushed", "invalidations", "purge_ids", "local")
    NODE_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_US_FIELD_NUMBER: _ClassVar[int]
    APPLIED_US_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    FLUSHED_FIELD_NUMBER: _ClassVar[int]
    INVALIDATIONS_FIELD_NUMBER: _ClassVar[int]
    PURGE_IDS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FIELD_NUMBER: _ClassVar[int]
    node: str
    origin: str
    epoch: int
    seq: int
    published_us: int
    applied_us: int
    dropped: int
    flushed: bool
    invalidations: int
    purge_ids: _containers.RepeatedScalarFieldContainer[str]
    local: bool
    def __init__(self, node: _Optional[str] = ..., origin: _Optional[str] = ..., epoch: _Optional[int] = ..., seq: _Optional[int] = ..., published_us: _Optional[int] = ..., applied_us: _Optional[int] = ..., dropped: _Optional[int] = ..., flushed: _Optional[bool] = ..., invalidations: _Optional[int] = ..., purge_ids: _Optional[_Iterable[str]] = ..., local: _Optional[bool] = ...) -> None: ...
