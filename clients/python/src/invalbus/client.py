"""Typed clients of a node's sidecar cache (`invalbus.cache.v1.Cache`): `Client` (blocking) and
`AsyncClient` (asyncio), over TCP (`host:port`) or a Unix socket (`unix:/path`).

Both open their gRPC channel lazily, on first use, and open a new one when they find themselves
in a new process (after a fork) or, for `AsyncClient`, on a new event loop: a pre-fork server
(gunicorn, uWSGI) can build a client at import time in its master. gRPC reconnects a channel by
itself; a call made while the node is down fails at once with `Unavailable` instead of waiting.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

from ._pb import cache_pb2 as pb
from ._pb import cache_pb2_grpc as pb_grpc
from .errors import from_rpc

DEFAULT_ADDRESS = "127.0.0.1:7700"
DEFAULT_TIMEOUT = 5.0
# Writes wait for NATS to take their invalidation; give them longer than reads.
DEFAULT_WRITE_TIMEOUT = 35.0


@dataclass(frozen=True)
class Entry:
    """What the node answered for one key."""

    found: bool
    value: bytes = b""
    tags: tuple[str, ...] = ()
    version: int | None = None
    #: How long the entry lives at most, in milliseconds (when found).
    ttl_ms: int = 0
    #: On a miss with `reserve`: pass it to `set` or `fill` with the value read after the miss.
    reservation: str = ""


@dataclass(frozen=True)
class SetItem:
    """One entry of `set_many`."""

    key: str
    value: bytes
    ttl: float | None = None
    tags: Sequence[str] = field(default_factory=tuple)
    version: int | None = None
    reservation: str = ""


@dataclass(frozen=True)
class WatchEvent:
    """One event of the `watch` stream (see `cache.proto`, `WatchEvent`)."""

    kind: str  # "keepalive", "invalidated", "flushed" or "not_serving"
    vouched_for_ms: int = 0
    #: For "invalidated": (kind, text, version) with kind "key", "tag", "prefix" or "all".
    items: tuple[tuple[str, str, int | None], ...] = ()


def _ttl_ms(ttl: float | None) -> int:
    """Seconds to the wire's milliseconds (0: the node cache's own time to live)."""
    if ttl is None:
        return 0
    return max(1, int(ttl * 1000))


def _entry(r: Any) -> Entry:
    if r.found:
        return Entry(
            True,
            r.value,
            tuple(r.tags),
            r.version if r.HasField("version") else None,
            r.ttl_ms,
        )
    return Entry(False, reservation=r.reservation)


def _set_request(cache: str, item: SetItem, reason: str = "") -> pb.SetRequest:
    return pb.SetRequest(
        cache=cache,
        key=item.key,
        value=item.value,
        tags=list(item.tags),
        version=item.version,
        ttl_ms=_ttl_ms(item.ttl),
        reservation=item.reservation,
        reason=reason,
    )


def _watch_event(e: Any) -> WatchEvent:
    which = e.WhichOneof("event")
    if which == "keepalive":
        return WatchEvent("keepalive", vouched_for_ms=e.keepalive.vouched_for_ms)
    if which == "invalidated":
        items = []
        for i in e.invalidated.items:
            kind = i.WhichOneof("target") or "all"
            text = "" if kind == "all" else getattr(i, kind)
            items.append((kind, text, i.version if i.HasField("version") else None))
        return WatchEvent("invalidated", items=tuple(items))
    return WatchEvent(which or "not_serving")


class _Base:
    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        token: str | None = None,
        cache: str = "default",
        timeout: float = DEFAULT_TIMEOUT,
        write_timeout: float = DEFAULT_WRITE_TIMEOUT,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.address = address
        self.cache = cache
        self.timeout = timeout
        self.write_timeout = write_timeout
        self._credentials = credentials
        token = token if token is not None else os.environ.get("INVALBUS_TOKEN", "")
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self._pid = -1

    def _target(self) -> str:
        # gRPC takes `unix:/abs/path` and `unix:rel/path` as they are.
        return self.address

    @property
    def _options(self) -> tuple[tuple[str, object], ...]:
        if self.address.startswith("unix:"):
            # gRPC would send the socket path as the HTTP/2 authority, which the node's HTTP/2
            # server refuses as malformed.
            return (*self._base_options, ("grpc.default_authority", "localhost"))
        return self._base_options

    _base_options: tuple[tuple[str, object], ...] = (
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
    )


class Client(_Base):
    """A blocking client; safe to share between threads.

    >>> c = Client("unix:/run/invalbus.sock", token="…", cache="default")  # doctest: +SKIP
    >>> c.set("greeting", b"hello")  # doctest: +SKIP
    True
    """

    def __init__(self, address: str = DEFAULT_ADDRESS, **kwargs: Any) -> None:
        super().__init__(address, **kwargs)
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._stub_obj: pb_grpc.CacheStub | None = None

    def _stub(self) -> pb_grpc.CacheStub:
        stub = self._stub_obj
        if stub is not None and self._pid == os.getpid():
            return stub
        with self._lock:
            if self._stub_obj is None or self._pid != os.getpid():
                # After a fork the parent's channel is not used (nor closed: it is the parent's).
                if self._credentials is not None:
                    self._channel = grpc.secure_channel(self._target(), self._credentials, options=self._options)
                else:
                    self._channel = grpc.insecure_channel(self._target(), options=self._options)
                self._stub_obj = pb_grpc.CacheStub(self._channel)
                self._pid = os.getpid()
            return self._stub_obj

    def _call(self, method: str, request: Any, write: bool = False) -> Any:
        try:
            return getattr(self._stub(), method)(
                request,
                timeout=self.write_timeout if write else self.timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as e:
            raise from_rpc(e) from None

    def get(self, key: str, *, reserve: bool = False) -> Entry:
        """The node's value of `key`; with `reserve`, a reservation on a miss."""
        return _entry(self._call("Get", pb.GetRequest(cache=self.cache, key=key, reserve=reserve)))

    def get_many(self, keys: Sequence[str], *, reserve: bool = False) -> list[Entry]:
        """`get` for several keys in one call, in order."""
        r = self._call("GetMany", pb.GetManyRequest(cache=self.cache, keys=list(keys), reserve=reserve))
        return [_entry(e) for e in r.entries]

    def set(
        self,
        key: str,
        value: bytes,
        *,
        ttl: float | None = None,
        tags: Sequence[str] = (),
        version: int | None = None,
        reservation: str = "",
        reason: str = "",
    ) -> bool:
        """A write: invalidates `key` on every node, then caches `value` here unless an
        invalidation landed since `reservation` (or since the call arrived). Returns whether it
        was cached."""
        item = SetItem(key, value, ttl, tags, version, reservation)
        return bool(self._call("Set", _set_request(self.cache, item, reason), write=True).stored)

    def set_many(self, items: Iterable[SetItem]) -> list[bool]:
        """`set` for several keys; their invalidations travel together."""
        req = pb.SetManyRequest(cache=self.cache, entries=[_set_request("", i) for i in items])
        return list(self._call("SetMany", req, write=True).stored)

    def add(
        self,
        key: str,
        value: bytes,
        *,
        ttl: float | None = None,
        tags: Sequence[str] = (),
        version: int | None = None,
        reservation: str = "",
    ) -> bool:
        """`set` if this node holds no value for `key`; returns whether it did."""
        item = SetItem(key, value, ttl, tags, version, reservation)
        return bool(self._call("Add", _set_request(self.cache, item), write=True).added)

    def incr(self, key: str, delta: int = 1) -> int:
        """Adds `delta` to an integer value (stored as decimal text) and returns the result."""
        return int(self._call("Incr", pb.IncrRequest(cache=self.cache, key=key, delta=delta), write=True).value)

    def touch(self, key: str, ttl: float | None = None) -> bool:
        """A new time to live for a held value; returns whether there was one."""
        return bool(self._call("Touch", pb.TouchRequest(cache=self.cache, key=key, ttl_ms=_ttl_ms(ttl))).touched)

    def delete(self, keys: Sequence[str], *, reason: str = "") -> list[bool]:
        """Invalidates `keys` on every node; says which ones this node held."""
        req = pb.DeleteRequest(cache=self.cache, keys=list(keys), reason=reason)
        return list(self._call("Delete", req, write=True).existed)

    def get_or_reserve(self, key: str) -> Entry:
        """The value, or a reservation to `fill` after loading it."""
        r = self._call("GetOrReserve", pb.GetRequest(cache=self.cache, key=key))
        return _entry(r)

    def fill(
        self,
        reservation: str,
        value: bytes,
        *,
        ttl: float | None = None,
        tags: Sequence[str] = (),
        version: int | None = None,
    ) -> bool:
        """Caches a value loaded after a miss, unless an invalidation overtook it. Not a write:
        nothing is published."""
        req = pb.FillRequest(
            reservation=reservation, value=value, tags=list(tags), version=version, ttl_ms=_ttl_ms(ttl)
        )
        return bool(self._call("Fill", req).stored)

    def invalidate_key(self, key: str, *, version: int | None = None, reason: str = "") -> int:
        """Invalidates `key` (at `version`: older values and fills are refused) everywhere."""
        req = pb.InvalidateKeyRequest(cache=self.cache, key=key, version=version, reason=reason)
        return int(self._call("InvalidateKey", req, write=True).seq)

    def invalidate_tag(self, tag: str, *, reason: str = "") -> int:
        """Drops every entry carrying `tag`, everywhere."""
        req = pb.InvalidateTagRequest(cache=self.cache, tag=tag, reason=reason)
        return int(self._call("InvalidateTag", req, write=True).seq)

    def invalidate_prefix(self, prefix: str, *, reason: str = "") -> int:
        """Drops every entry whose key starts with `prefix`, everywhere."""
        req = pb.InvalidatePrefixRequest(cache=self.cache, prefix=prefix, reason=reason)
        return int(self._call("InvalidatePrefix", req, write=True).seq)

    def invalidate_all(self, *, reason: str = "") -> int:
        """Drops everything in the cache, everywhere."""
        req = pb.InvalidateAllRequest(cache=self.cache, reason=reason)
        return int(self._call("InvalidateAll", req, write=True).seq)

    def watch(self) -> Iterator[WatchEvent]:
        """The node's events for this cache, as it applies them (for an in-process cache). Ends
        with `Unavailable` when the stream breaks; `cancel()` the returned iterator to stop."""
        stream = self._stub().Watch(pb.WatchRequest(cache=self.cache), metadata=self._metadata)
        return _WatchIterator(stream)

    def close(self) -> None:
        """Closes the channel (a later call opens a new one)."""
        with self._lock:
            if self._channel is not None and self._pid == os.getpid():
                self._channel.close()
            self._channel = None
            self._stub_obj = None


class _WatchIterator:
    """Typed events over a gRPC response stream; `cancel()` ends it."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def __iter__(self) -> _WatchIterator:
        return self

    def __next__(self) -> WatchEvent:
        try:
            return _watch_event(next(self._stream))
        except grpc.RpcError as e:
            raise from_rpc(e) from None

    def cancel(self) -> None:
        self._stream.cancel()


class AsyncClient(_Base):
    """The asyncio client: the same calls as `Client`, awaited. One channel per event loop."""

    def __init__(self, address: str = DEFAULT_ADDRESS, **kwargs: Any) -> None:
        super().__init__(address, **kwargs)
        self._channel: grpc.aio.Channel | None = None
        self._stub_obj: pb_grpc.CacheStub | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _stub(self) -> pb_grpc.CacheStub:
        loop = asyncio.get_running_loop()
        if self._stub_obj is None or self._loop is not loop or self._pid != os.getpid():
            if self._credentials is not None:
                self._channel = grpc.aio.secure_channel(self._target(), self._credentials, options=self._options)
            else:
                self._channel = grpc.aio.insecure_channel(self._target(), options=self._options)
            self._stub_obj = pb_grpc.CacheStub(self._channel)
            self._loop = loop
            self._pid = os.getpid()
        return self._stub_obj

    async def _call(self, method: str, request: Any, write: bool = False) -> Any:
        try:
            return await getattr(self._stub(), method)(
                request,
                timeout=self.write_timeout if write else self.timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as e:
            raise from_rpc(e) from None

    async def get(self, key: str, *, reserve: bool = False) -> Entry:
        return _entry(await self._call("Get", pb.GetRequest(cache=self.cache, key=key, reserve=reserve)))

    async def get_many(self, keys: Sequence[str], *, reserve: bool = False) -> list[Entry]:
        r = await self._call("GetMany", pb.GetManyRequest(cache=self.cache, keys=list(keys), reserve=reserve))
        return [_entry(e) for e in r.entries]

    async def set(
        self,
        key: str,
        value: bytes,
        *,
        ttl: float | None = None,
        tags: Sequence[str] = (),
        version: int | None = None,
        reservation: str = "",
        reason: str = "",
    ) -> bool:
        item = SetItem(key, value, ttl, tags, version, reservation)
        return bool((await self._call("Set", _set_request(self.cache, item, reason), write=True)).stored)

    async def set_many(self, items: Iterable[SetItem]) -> list[bool]:
        req = pb.SetManyRequest(cache=self.cache, entries=[_set_request("", i) for i in items])
        return list((await self._call("SetMany", req, write=True)).stored)

    async def add(
        self,
        key: str,
        value: bytes,
        *,
        ttl: float | None = None,
        tags: Sequence[str] = (),
        version: int | None = None,
        reservation: str = "",
    ) -> bool:
        item = SetItem(key, value, ttl, tags, version, reservation)
        return bool((await self._call("Add", _set_request(self.cache, item), write=True)).added)

    async def incr(self, key: str, delta: int = 1) -> int:
        r = await self._call("Incr", pb.IncrRequest(cache=self.cache, key=key, delta=delta), write=True)
        return int(r.value)

    async def touch(self, key: str, ttl: float | None = None) -> bool:
        r = await self._call("Touch", pb.TouchRequest(cache=self.cache, key=key, ttl_ms=_ttl_ms(ttl)))
        return bool(r.touched)

    async def delete(self, keys: Sequence[str], *, reason: str = "") -> list[bool]:
        req = pb.DeleteRequest(cache=self.cache, keys=list(keys), reason=reason)
        return list((await self._call("Delete", req, write=True)).existed)

    async def get_or_reserve(self, key: str) -> Entry:
        return _entry(await self._call("GetOrReserve", pb.GetRequest(cache=self.cache, key=key)))

    async def fill(
        self,
        reservation: str,
        value: bytes,
        *,
        ttl: float | None = None,
        tags: Sequence[str] = (),
        version: int | None = None,
    ) -> bool:
        req = pb.FillRequest(
            reservation=reservation, value=value, tags=list(tags), version=version, ttl_ms=_ttl_ms(ttl)
        )
        return bool((await self._call("Fill", req)).stored)

    async def invalidate_key(self, key: str, *, version: int | None = None, reason: str = "") -> int:
        req = pb.InvalidateKeyRequest(cache=self.cache, key=key, version=version, reason=reason)
        return int((await self._call("InvalidateKey", req, write=True)).seq)

    async def invalidate_tag(self, tag: str, *, reason: str = "") -> int:
        req = pb.InvalidateTagRequest(cache=self.cache, tag=tag, reason=reason)
        return int((await self._call("InvalidateTag", req, write=True)).seq)

    async def invalidate_prefix(self, prefix: str, *, reason: str = "") -> int:
        req = pb.InvalidatePrefixRequest(cache=self.cache, prefix=prefix, reason=reason)
        return int((await self._call("InvalidatePrefix", req, write=True)).seq)

    async def invalidate_all(self, *, reason: str = "") -> int:
        req = pb.InvalidateAllRequest(cache=self.cache, reason=reason)
        return int((await self._call("InvalidateAll", req, write=True)).seq)

    async def close(self) -> None:
        """Closes the channel of the current loop (a later call opens a new one)."""
        if self._channel is not None and self._pid == os.getpid():
            await self._channel.close()
        self._channel = None
        self._stub_obj = None
