"""What a Python process keeps for itself: the reservations of its recent misses (per thread or
asyncio task), and the optional in-process cache (L1) kept coherent by the node's Watch stream.

# The L1's bound, and why it holds
The L1 copies what its node served. It serves a copy only while
1. its Watch stream to the node is open, and
2. the time is before `received + min(vouched_for, MAX_SILENCE)` of the latest keepalive, where
   `vouched_for` is how long the node still vouches for its caches without new evidence (the
   node sends a keepalive at least every 100 ms; `MAX_SILENCE` is 1 s).
Every invalidation the node applies (keys, tags, prefixes, whole-cache flushes) is sent on the
stream after it took effect on the node, and the L1 applies it as it arrives. A stream that
breaks, lags (the node ends it), or reports `not_serving` or a flush empties the L1, which then
reads from the node until a new stream has sent a keepalive. A copy is only kept if no event
covering its key arrived between the start of the read that fetched it and its insertion (a
generation check, as the node's leases do).

So an L1 read never returns a value older than an invalidation that its node applied more than
`stream delivery` ago while the stream was live, and an L1 whose stream stalls silently stops
serving within `MAX_SILENCE` of the last keepalive it received. With the node's own bound
(`Bus::staleness_bound`, ~2 s: an invalidation accepted by NATS is applied on every serving node
within it, or that node stops serving), an L1 read is never older than an invalidation accepted
more than `node bound + stream delivery` ago, where delivery is what a live local stream takes
(sub-millisecond on one host) and a stalled stream is cut off after at most `MAX_SILENCE`.
The checker `clients/python/tests/test_coherence.py` measures it across processes and nodes,
with a fault on a node's NATS link, with and without the L1.
"""

from __future__ import annotations

import contextvars
import logging
import os
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

from .errors import InvalbusError

if TYPE_CHECKING:
    from .client import Client

log = logging.getLogger("invalbus.local")

#: How long a reservation is remembered (the node keeps it 30 s).
RESERVATION_SECONDS = 25.0
#: Most reservations one thread or task remembers.
MAX_RESERVATIONS = 256

# Per thread (a new thread starts with an empty context) and per asyncio task (a task runs in a
# copy of its creator's context, and `set` changes only its own copy). The mapping is replaced,
# never changed in place, so no two threads or tasks ever share one.
_reservations: contextvars.ContextVar[dict[tuple[int, str], tuple[str, float]]] = contextvars.ContextVar(
    "invalbus_reservations"
)


def remember(owner: int, key: str, reservation: str) -> None:
    """Remembers the reservation of a miss of `key` for this thread or task."""
    current = _reservations.get(None) or {}
    now = time.monotonic()
    fresh = {k: v for k, v in current.items() if now - v[1] < RESERVATION_SECONDS}
    fresh.pop((owner, key), None)
    while len(fresh) >= MAX_RESERVATIONS:
        fresh.pop(next(iter(fresh)))
    fresh[(owner, key)] = (reservation, now)
    _reservations.set(fresh)


def take(owner: int, key: str) -> str:
    """The reservation of a recent miss of `key` in this thread or task, forgotten once taken
    (empty if none)."""
    current = _reservations.get(None)
    if not current or (owner, key) not in current:
        return ""
    rest = dict(current)
    reservation, at = rest.pop((owner, key))
    _reservations.set(rest)
    return reservation if time.monotonic() - at < RESERVATION_SECONDS else ""


def forget(owner: int, key: str) -> None:
    """Forgets a reservation (after a delete of the key, say)."""
    take(owner, key)


def forget_all(owner: int) -> None:
    """Forgets every reservation of `owner` in this thread or task: at the end of a request
    (Django closes its caches then), and after this thread's own `clear()`, a later `set` is
    not the read-through of an earlier miss."""
    current = _reservations.get(None)
    if current and any(k[0] == owner for k in current):
        _reservations.set({k: v for k, v in current.items() if k[0] != owner})


# Bumped in a child after fork: a layer compares it instead of calling os.getpid() per read.
_fork_generation = 0


def _forked() -> None:
    global _fork_generation
    _fork_generation += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)

#: Longest time the L1 serves after the last keepalive, whatever the node vouches for.
MAX_SILENCE = 1.0
#: Most distinct keys remembered as recently invalidated before falling back to "everything".
MAX_KEY_GENERATIONS = 100_000


class _Copy:
    __slots__ = ("expires", "tags", "value")

    def __init__(self, value: bytes, tags: tuple[str, ...], expires: float) -> None:
        self.value = value
        self.tags = tags
        self.expires = expires


class LocalLayer:
    """A bounded in-process copy of one node cache (LRU), coherent through the node's Watch
    stream. Thread-safe; its stream runs in a daemon thread started on first use in each
    process (so a pre-fork master can build it: the worker starts its own)."""

    def __init__(self, client: Client, max_entries: int) -> None:
        self._client = client
        self._max = max_entries
        self._lock = threading.Lock()
        self._pid = -1
        self._generation = -1
        self._reset()

    def _reset(self) -> None:
        self._entries: OrderedDict[str, _Copy] = OrderedDict()
        self._by_tag: dict[str, set[str]] = {}
        self._gen = 0
        self._key_gen: dict[str, int] = {}
        self._all_gen = 0
        self._serving_until = 0.0
        self._stream = None
        self._stop = threading.Event()
        self.hits = 0
        self.misses = 0
        self.stats = {"refused_puts": 0, "drops": 0, "streams": 0}

    def _ensure(self) -> None:
        if self._generation == _fork_generation:
            return
        with self._lock:
            if self._generation == _fork_generation and self._pid == os.getpid():
                return
            # A new process (first use, or a fork): nothing of the parent's copy or thread.
            self._reset()
            self._pid = os.getpid()
            self._generation = _fork_generation
            threading.Thread(target=self._run, name="invalbus-l1-watch", daemon=True).start()

    def serving(self) -> bool:
        """Whether the L1 may serve right now."""
        self._ensure()
        return time.monotonic() < self._serving_until

    def get(self, key: str) -> bytes | None:
        """The copy of `key`, if the L1 may serve and holds a live one."""
        if self._generation != _fork_generation:
            self._ensure()
        now = time.monotonic()
        if now >= self._serving_until:
            return None
        c = self._entries.get(key)
        if c is None or c.expires <= now:
            self.misses += 1
            return None
        self.hits += 1
        return c.value

    def begin(self) -> int:
        """Call before reading from the node; pass the result to `put`."""
        self._ensure()
        return self._gen

    def put(self, key: str, value: bytes, tags: tuple[str, ...], ttl_ms: int, since: int) -> bool:
        """Keeps a copy read from the node, unless an event covering it arrived since `since`."""
        now = time.monotonic()
        with self._lock:
            if (
                now >= self._serving_until
                or self._all_gen > since
                or self._key_gen.get(key, 0) > since
                or any(self._key_gen.get("\0tag\0" + t, 0) > since for t in tags)
                or self._key_gen.get("\0prefix", 0) > since
            ):
                self.stats["refused_puts"] += 1
                return False
            self._remove(key)
            self._entries[key] = _Copy(value, tags, now + ttl_ms / 1000.0)
            for t in tags:
                self._by_tag.setdefault(t, set()).add(key)
            while len(self._entries) > self._max:
                self._remove(next(iter(self._entries)))
            return True

    def drop(self, key: str) -> None:
        """Drops the copy of `key` (a write by this process)."""
        with self._lock:
            self._gen += 1
            self._mark(key)
            self._remove(key)

    def clear(self) -> None:
        """Drops every copy."""
        with self._lock:
            self._drop_all()

    def close(self) -> None:
        """Stops the stream and drops every copy (a later use starts again)."""
        with self._lock:
            self._stop.set()
            s = self._stream
            self._drop_all()
            self._pid = -1
            self._generation = -1
        if s is not None:
            s.cancel()

    # Under the lock.
    def _remove(self, key: str) -> None:
        c = self._entries.pop(key, None)
        if c is not None:
            for t in c.tags:
                keys = self._by_tag.get(t)
                if keys is not None:
                    keys.discard(key)
                    if not keys:
                        del self._by_tag[t]

    def _mark(self, key: str) -> None:
        if len(self._key_gen) >= MAX_KEY_GENERATIONS:
            self._key_gen.clear()
            self._all_gen = self._gen
        self._key_gen[key] = self._gen

    def _drop_all(self) -> None:
        self._gen += 1
        self._all_gen = self._gen
        self._key_gen.clear()
        if self._entries:
            self.stats["drops"] += 1
        self._entries.clear()
        self._by_tag.clear()

    def _apply(self, items: tuple[tuple[str, str, int | None], ...]) -> None:
        with self._lock:
            self._gen += 1
            for kind, text, _version in items:
                if kind == "key":
                    self._mark(text)
                    self._remove(text)
                elif kind == "tag":
                    self._mark("\0tag\0" + text)
                    for k in list(self._by_tag.get(text, ())):
                        self._remove(k)
                elif kind == "prefix":
                    self._key_gen["\0prefix"] = self._gen
                    for k in [k for k in self._entries if k.startswith(text)]:
                        self._remove(k)
                else:
                    self._drop_all()

    def _run(self) -> None:
        me = os.getpid()
        backoff = 0.05
        while not self._stop.is_set() and self._pid == me:
            stream = None
            try:
                stream = self._client.watch()
                with self._lock:
                    self._stream = stream
                self.stats["streams"] += 1
                for ev in stream:
                    if self._pid != me or self._stop.is_set():
                        break
                    if ev.kind == "keepalive":
                        backoff = 0.05
                        window = min(ev.vouched_for_ms / 1000.0, MAX_SILENCE)
                        self._serving_until = time.monotonic() + window
                    elif ev.kind == "invalidated":
                        self._apply(ev.items)
                    else:
                        # Flushed, or the node stopped serving: drop everything until the next
                        # keepalive says the node serves again.
                        with self._lock:
                            self._serving_until = 0.0
                            self._drop_all()
                log.info("invalbus L1: watch stream ended; serving from the node until it is back")
            except InvalbusError as e:
                log.info("invalbus L1: watch stream broke (%s); serving from the node until it is back", e)
            except Exception:  # a bug must not kill the thread silently and leave the L1 serving
                log.exception("invalbus L1: watch thread failed; dropping the copy")
            finally:
                with self._lock:
                    self._serving_until = 0.0
                    self._stream = None
                    self._drop_all()
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 1.0)
