"""`InvalbusCache`: the Django cache backend over a node's sidecar, and nothing else (the wire
work is `invalbus.client`, the in-process layer and reservations `invalbus.local`).

    CACHES = {
        "default": {
            "BACKEND": "invalbus.django.InvalbusCache",
            "LOCATION": "unix:/run/invalbus.sock",   # or "127.0.0.1:7700"
            "OPTIONS": {"TOKEN": "…"},                # or the INVALBUS_TOKEN environment variable
        }
    }

OPTIONS (all optional):
- `TOKEN`: the node token with the `cache` role (default: `$INVALBUS_TOKEN`).
- `CACHE`: the node's cache name (default `"default"`).
- `LOCAL_MAX_ENTRIES`: entries of the in-process layer (L1); 0 turns it off (default 10,000).
- `SERIALIZER`: dotted path of a serializer class (default
  `"invalbus.serializers.PickleSerializer"`).
- `SOCKET_TIMEOUT`: seconds a read waits for the node (default 5); `WRITE_TIMEOUT`: seconds a
  write waits for NATS to take its invalidation (default 35).
- `READ_SOCKET`: the node's read socket (`"unix:/run/invalbus-read.sock"`, its `read_listen`):
  blocking `get`, `get_many` and `has_key` go through it instead of gRPC (faster from Python).
- `RESERVATIONS`: whether a `get` miss takes a reservation that a following `set` of the key
  in the same thread or task fills through (default True; see the README on the stale-set race).

Semantics to know (the README has the whole list): a write (`set`, `add`, `incr`, `delete`, …)
invalidates the key in every process on every host; a value is visible to the processes that
share its node, not to other hosts (they miss and read the source); timeouts are capped by the
node cache's time to live; `add` and `incr` are atomic among one node's processes.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

from django.core.cache.backends.base import DEFAULT_TIMEOUT, BaseCache
from django.utils.module_loading import import_string

from .. import local
from ..client import AsyncClient, Client, SetItem
from ..errors import KeyNotFound, NotAnInteger, ReservationLost
from ..local import LocalLayer
from ..readsock import ReadSocket

_MISSING = object()
_owner_ids = itertools.count(1)

# One client, async client and L1 per process and configuration: Django makes a backend object
# per thread (and per async context), and they must share the channel and the L1.
_shared: dict[tuple[Any, ...], tuple[Client, AsyncClient, LocalLayer | None, ReadSocket | None, int]] = {}
_shared_lock = threading.Lock()


def _shared_for(
    location: str, options: dict[str, Any]
) -> tuple[Client, AsyncClient, LocalLayer | None, ReadSocket | None, int]:
    token = options.get("TOKEN")
    cache = options.get("CACHE", "default")
    local_max = int(options.get("LOCAL_MAX_ENTRIES", 10_000))
    timeout = float(options.get("SOCKET_TIMEOUT", 5.0))
    write_timeout = float(options.get("WRITE_TIMEOUT", 35.0))
    read_socket = options.get("READ_SOCKET")
    key = (location, token, cache, local_max, timeout, write_timeout, read_socket)
    with _shared_lock:
        found = _shared.get(key)
        if found is None:
            kw: dict[str, Any] = {"token": token, "cache": cache, "timeout": timeout, "write_timeout": write_timeout}
            client = Client(location, **kw)
            l1 = LocalLayer(Client(location, **kw), local_max) if local_max > 0 else None
            reads = ReadSocket(read_socket, token=token, cache=cache, timeout=timeout) if read_socket else None
            found = (client, AsyncClient(location, **kw), l1, reads, next(_owner_ids))
            _shared[key] = found
        return found


class InvalbusCache(BaseCache):
    """Django's cache API over an invalbus node (see the module docs for the settings)."""

    def __init__(self, server: str | list[str] | None, params: dict[str, Any]) -> None:
        super().__init__(params)
        if isinstance(server, (list, tuple)):
            server = server[0] if server else None
        options = dict(params.get("OPTIONS") or {})
        self._location = server or os.environ.get("INVALBUS_LOCATION", "127.0.0.1:7700")
        self._client, self._aclient, self._l1, reads, self._owner = _shared_for(self._location, options)
        # Blocking reads go through the read socket when there is one (faster than a gRPC call).
        self._reads: Client | ReadSocket = reads or self._client
        self._reserve = bool(options.get("RESERVATIONS", True))
        serializer = options.get("SERIALIZER", "invalbus.serializers.PickleSerializer")
        self._serializer = import_string(serializer)() if isinstance(serializer, str) else serializer()

    # --- helpers ------------------------------------------------------------------------------

    @property
    def client(self) -> Client:
        """The sidecar client (for calls this API has no method for)."""
        return self._client

    @property
    def local(self) -> LocalLayer | None:
        """The in-process layer, if on."""
        return self._l1

    def _ttl(self, timeout: Any) -> float | None:
        """Seconds to live (None: as long as the node keeps it); 0 or less: do not store."""
        if timeout is DEFAULT_TIMEOUT:
            timeout = self.default_timeout
        return None if timeout is None else float(timeout)

    def _dumps(self, value: Any) -> bytes:
        return self._serializer.dumps(value)

    def _loads(self, data: bytes) -> Any:
        return self._serializer.loads(data)

    def _remember(self, key: str, reservation: str) -> None:
        if reservation and self._reserve:
            local.remember(self._owner, key, reservation)

    def _take(self, key: str) -> str:
        return local.take(self._owner, key) if self._reserve else ""

    def _drop_local(self, keys: Iterable[str]) -> None:
        # Called before a write (so that this process stops serving the old copy) and after it
        # (a read by another thread in between may have copied the old value back; the write's
        # own event would drop it too, a stream delivery later).
        if self._l1 is not None:
            for k in keys:
                self._l1.drop(k)

    # --- Django's cache API (blocking) ---------------------------------------------------------

    def get(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        key = self.make_and_validate_key(key, version=version)
        l1 = self._l1
        since = 0
        if l1 is not None:
            data = l1.get(key)
            if data is not None:
                return self._loads(data)
            since = l1.begin()
        e = self._reads.get(key, reserve=self._reserve)
        if e.found:
            if l1 is not None:
                l1.put(key, e.value, e.tags, e.ttl_ms, since)
            return self._loads(e.value)
        self._remember(key, e.reservation)
        return default

    def set(self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> None:
        key = self.make_and_validate_key(key, version=version)
        data = self._dumps(value)
        ttl = self._ttl(timeout)
        self._drop_local([key])
        if ttl is not None and ttl <= 0:
            local.forget(self._owner, key)
            self._client.delete([key], reason="set with timeout 0")
            return
        self._client.set(key, data, ttl=ttl, reservation=self._take(key))
        self._drop_local([key])

    def add(self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> bool:
        key = self.make_and_validate_key(key, version=version)
        data = self._dumps(value)
        ttl = self._ttl(timeout)
        if ttl is not None and ttl <= 0:
            # Added and expired at once, as LocMemCache does: true if there was no value.
            return not self._client.get(key).found
        self._drop_local([key])
        added = self._client.add(key, data, ttl=ttl, reservation=self._take(key))
        self._drop_local([key])
        return added

    def touch(self, key: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> bool:
        key = self.make_and_validate_key(key, version=version)
        ttl = self._ttl(timeout)
        # Not a write: other processes' L1 copies keep their own expiry (at most the node
        # cache's time to live); this process drops its copy so that it sees the new one.
        self._drop_local([key])
        if ttl is not None and ttl <= 0:
            return self._client.delete([key], reason="touch with timeout 0")[0]
        return self._client.touch(key, ttl)

    def delete(self, key: Any, version: int | None = None) -> bool:
        key = self.make_and_validate_key(key, version=version)
        self._drop_local([key])
        local.forget(self._owner, key)
        existed = self._client.delete([key])[0]
        self._drop_local([key])
        return existed

    def get_many(self, keys: Iterable[Any], version: int | None = None) -> dict[Any, Any]:
        made = {self.make_and_validate_key(k, version=version): k for k in keys}
        out: dict[Any, Any] = {}
        rest = []
        l1 = self._l1
        for mk, k in made.items():
            data = l1.get(mk) if l1 is not None else None
            if data is not None:
                out[k] = self._loads(data)
            else:
                rest.append(mk)
        if rest:
            since = l1.begin() if l1 is not None else 0
            for mk, e in zip(rest, self._reads.get_many(rest, reserve=self._reserve), strict=True):
                if e.found:
                    if l1 is not None:
                        l1.put(mk, e.value, e.tags, e.ttl_ms, since)
                    out[made[mk]] = self._loads(e.value)
                else:
                    self._remember(mk, e.reservation)
        return out

    def set_many(self, data: dict[Any, Any], timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> list[Any]:
        if not data:
            return []
        items = {self.make_and_validate_key(k, version=version): self._dumps(v) for k, v in data.items()}
        ttl = self._ttl(timeout)
        self._drop_local(items)
        if ttl is not None and ttl <= 0:
            self._client.delete(list(items), reason="set_many with timeout 0")
            return []
        self._client.set_many(SetItem(k, v, ttl, (), None, self._take(k)) for k, v in items.items())
        self._drop_local(items)
        # A value not cached because an invalidation overtook it is not a failure: the key was
        # written by someone else meanwhile.
        return []

    def delete_many(self, keys: Iterable[Any], version: int | None = None) -> None:
        made = [self.make_and_validate_key(k, version=version) for k in keys]
        if made:
            self._drop_local(made)
            self._client.delete(made)
            self._drop_local(made)

    def has_key(self, key: Any, version: int | None = None) -> bool:
        key = self.make_and_validate_key(key, version=version)
        if self._l1 is not None and self._l1.get(key) is not None:
            return True
        return self._reads.get(key).found

    def incr(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        key = self.make_and_validate_key(key, version=version)
        self._drop_local([key])
        try:
            return self._client.incr(key, delta)
        except KeyNotFound:
            raise ValueError(f"Key '{key}' not found") from None
        except NotAnInteger as e:
            raise TypeError(str(e)) from None
        finally:
            self._drop_local([key])

    def decr(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        return self.incr(key, -delta, version=version)

    def clear(self) -> None:
        if self._l1 is not None:
            self._l1.clear()
        local.forget_all(self._owner)
        self._client.invalidate_all(reason="cache.clear()")

    def get_or_set(self, key: Any, default: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> Any:
        """A read-through: the value, or `default` (called if callable) filled through the
        miss's reservation. Not a write: nothing is published, and a value overtaken by an
        invalidation is returned but not cached."""
        made = self.make_and_validate_key(key, version=version)
        since = 0
        if self._l1 is not None:
            data = self._l1.get(made)
            if data is not None:
                return self._loads(data)
            since = self._l1.begin()
        e = self._client.get_or_reserve(made)
        if e.found:
            if self._l1 is not None:
                self._l1.put(made, e.value, e.tags, e.ttl_ms, since)
            return self._loads(e.value)
        if callable(default):
            default = default()
        ttl = self._ttl(timeout)
        if ttl is None or ttl > 0:
            try:
                self._client.fill(e.reservation, self._dumps(default), ttl=ttl)
            except ReservationLost:
                pass
        return default

    def get_or_load(
        self,
        key: Any,
        loader: Callable[[], Any],
        *,
        tags: Iterable[str] = (),
        data_version: int | None = None,
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
    ) -> Any:
        """Reads through with the stale-fill guard: the value, or `loader()` cached under `tags`
        and `data_version` (the version of the data, as in `invalidate_key(..., version=)`;
        Django's `version` names the key's version), unless an invalidation overtook the load.
        """
        made = self.make_and_validate_key(key, version=version)
        since = 0
        if self._l1 is not None:
            data = self._l1.get(made)
            if data is not None:
                return self._loads(data)
            since = self._l1.begin()
        e = self._client.get_or_reserve(made)
        if e.found:
            if self._l1 is not None:
                self._l1.put(made, e.value, e.tags, e.ttl_ms, since)
            return self._loads(e.value)
        value = loader()
        ttl = self._ttl(timeout)
        if ttl is None or ttl > 0:
            try:
                self._client.fill(e.reservation, self._dumps(value), ttl=ttl, tags=list(tags), version=data_version)
            except ReservationLost:
                pass
        return value

    def invalidate_tag(self, tag: str) -> None:
        """Drops every entry tagged `tag` (by `get_or_load`) in every process on every host."""
        self._client.invalidate_tag(tag)

    def invalidate_prefix(self, prefix: str, version: int | None = None) -> None:
        """Drops every entry whose Django key starts with `prefix` (made with this cache's
        KEY_PREFIX and `version`, so the default key function is assumed)."""
        self._client.invalidate_prefix(self.make_key(prefix, version=version))

    def invalidate_key(self, key: Any, *, data_version: int | None = None, version: int | None = None) -> None:
        """Invalidates `key` everywhere; with `data_version`, values of older data versions are
        dropped and refused."""
        made = self.make_and_validate_key(key, version=version)
        self._drop_local([made])
        self._client.invalidate_key(made, version=data_version)

    def close(self, **kwargs: Any) -> None:
        # Called at the end of every request: a miss of this request is not the read behind a
        # set of the next one. The channel and the L1 are kept for the process.
        local.forget_all(self._owner)

    # --- Django's cache API (asyncio, native) ---------------------------------------------------

    async def aget(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        key = self.make_and_validate_key(key, version=version)
        l1 = self._l1
        since = 0
        if l1 is not None:
            data = l1.get(key)
            if data is not None:
                return self._loads(data)
            since = l1.begin()
        e = await self._aclient.get(key, reserve=self._reserve)
        if e.found:
            if l1 is not None:
                l1.put(key, e.value, e.tags, e.ttl_ms, since)
            return self._loads(e.value)
        self._remember(key, e.reservation)
        return default

    async def aset(self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> None:
        key = self.make_and_validate_key(key, version=version)
        data = self._dumps(value)
        ttl = self._ttl(timeout)
        self._drop_local([key])
        if ttl is not None and ttl <= 0:
            local.forget(self._owner, key)
            await self._aclient.delete([key], reason="set with timeout 0")
            return
        await self._aclient.set(key, data, ttl=ttl, reservation=self._take(key))
        self._drop_local([key])

    async def aadd(self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> bool:
        key = self.make_and_validate_key(key, version=version)
        data = self._dumps(value)
        ttl = self._ttl(timeout)
        if ttl is not None and ttl <= 0:
            return not (await self._aclient.get(key)).found
        self._drop_local([key])
        added = await self._aclient.add(key, data, ttl=ttl, reservation=self._take(key))
        self._drop_local([key])
        return added

    async def atouch(self, key: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> bool:
        key = self.make_and_validate_key(key, version=version)
        ttl = self._ttl(timeout)
        self._drop_local([key])
        if ttl is not None and ttl <= 0:
            return (await self._aclient.delete([key], reason="touch with timeout 0"))[0]
        return await self._aclient.touch(key, ttl)

    async def adelete(self, key: Any, version: int | None = None) -> bool:
        key = self.make_and_validate_key(key, version=version)
        self._drop_local([key])
        local.forget(self._owner, key)
        existed = (await self._aclient.delete([key]))[0]
        self._drop_local([key])
        return existed

    async def aget_many(self, keys: Iterable[Any], version: int | None = None) -> dict[Any, Any]:
        made = {self.make_and_validate_key(k, version=version): k for k in keys}
        out: dict[Any, Any] = {}
        rest = []
        l1 = self._l1
        for mk, k in made.items():
            data = l1.get(mk) if l1 is not None else None
            if data is not None:
                out[k] = self._loads(data)
            else:
                rest.append(mk)
        if rest:
            since = l1.begin() if l1 is not None else 0
            got = await self._aclient.get_many(rest, reserve=self._reserve)
            for mk, e in zip(rest, got, strict=True):
                if e.found:
                    if l1 is not None:
                        l1.put(mk, e.value, e.tags, e.ttl_ms, since)
                    out[made[mk]] = self._loads(e.value)
                else:
                    self._remember(mk, e.reservation)
        return out

    async def aset_many(
        self, data: dict[Any, Any], timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> list[Any]:
        if not data:
            return []
        items = {self.make_and_validate_key(k, version=version): self._dumps(v) for k, v in data.items()}
        ttl = self._ttl(timeout)
        self._drop_local(items)
        if ttl is not None and ttl <= 0:
            await self._aclient.delete(list(items), reason="set_many with timeout 0")
            return []
        await self._aclient.set_many(SetItem(k, v, ttl, (), None, self._take(k)) for k, v in items.items())
        self._drop_local(items)
        return []

    async def adelete_many(self, keys: Iterable[Any], version: int | None = None) -> None:
        made = [self.make_and_validate_key(k, version=version) for k in keys]
        if made:
            self._drop_local(made)
            await self._aclient.delete(made)
            self._drop_local(made)

    async def ahas_key(self, key: Any, version: int | None = None) -> bool:
        key = self.make_and_validate_key(key, version=version)
        if self._l1 is not None and self._l1.get(key) is not None:
            return True
        return (await self._aclient.get(key)).found

    async def aincr(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        key = self.make_and_validate_key(key, version=version)
        self._drop_local([key])
        try:
            return await self._aclient.incr(key, delta)
        except KeyNotFound:
            raise ValueError(f"Key '{key}' not found") from None
        except NotAnInteger as e:
            raise TypeError(str(e)) from None
        finally:
            self._drop_local([key])

    async def adecr(self, key: Any, delta: int = 1, version: int | None = None) -> int:
        return await self.aincr(key, -delta, version=version)

    async def aclear(self) -> None:
        if self._l1 is not None:
            self._l1.clear()
        local.forget_all(self._owner)
        await self._aclient.invalidate_all(reason="cache.clear()")

    async def aget_or_set(
        self, key: Any, default: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> Any:
        made = self.make_and_validate_key(key, version=version)
        since = 0
        if self._l1 is not None:
            data = self._l1.get(made)
            if data is not None:
                return self._loads(data)
            since = self._l1.begin()
        e = await self._aclient.get_or_reserve(made)
        if e.found:
            if self._l1 is not None:
                self._l1.put(made, e.value, e.tags, e.ttl_ms, since)
            return self._loads(e.value)
        if callable(default):
            default = default()
        ttl = self._ttl(timeout)
        if ttl is None or ttl > 0:
            try:
                await self._aclient.fill(e.reservation, self._dumps(default), ttl=ttl)
            except ReservationLost:
                pass
        return default

    async def aclose(self, **kwargs: Any) -> None:
        local.forget_all(self._owner)
