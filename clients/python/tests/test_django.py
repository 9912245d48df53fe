"""The Django backend beyond Django's own suite: the stale-set race with the interleaving forced,
get_or_load with tags and data versions, purges, and the native async methods."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from cluster import TOKEN, Node, wait_for


@pytest.fixture(scope="module")
def caches(two_nodes: tuple[object, Node, Node]) -> Iterator[Any]:
    import django
    from django.conf import settings

    _, a, b = two_nodes

    def entry(node: Node, **options: Any) -> dict[str, Any]:
        return {
            "BACKEND": "invalbus.django.InvalbusCache",
            "LOCATION": node.address,
            "OPTIONS": {"TOKEN": TOKEN, "LOCAL_MAX_ENTRIES": 0, **options},
        }

    if not settings.configured:
        settings.configure(
            CACHES={
                "default": entry(a),
                "noreserve": entry(a, RESERVATIONS=False),
                "b": entry(b),
            },
            INSTALLED_APPS=[],
        )
        django.setup()
    from django.core.cache import caches as django_caches

    yield django_caches


def key(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def overtake(caches: Any, k: str) -> None:
    """Another worker, on the other host, writes the row and deletes the key; returns once node
    a has applied it (a marker deleted after it is gone there: batches apply in order)."""
    marker = key("marker")
    caches["default"].client.set(marker, b"m")
    caches["b"].delete(k)
    caches["b"].client.delete([marker])
    wait_for("node a to apply the other host's delete", lambda: not caches["default"].client.get(marker).found)


def test_get_miss_then_set_is_refused_when_a_write_overtook_it(caches: Any) -> None:
    cache = caches["default"]
    k = key("article")
    assert cache.get(k) is None  # the miss takes a reservation, remembered for this thread
    row = "v1 as read from the database"
    overtake(caches, k)  # the row is written (v2) and the key deleted elsewhere meanwhile
    cache.set(k, row)  # ordinary Django code: fills through the reservation, refused
    assert cache.get(k) is None, "a value read before another worker's delete was cached"
    # The next read-through caches what it reads.
    cache.set(k, "v2")
    assert cache.get(k) == "v2"

    # The control: with reservations off, the same interleaving caches the stale row.
    plain = caches["noreserve"]
    k = key("article")
    assert plain.get(k) is None
    overtake(caches, k)
    plain.set(k, row)
    assert plain.get(k) == row


def test_reservations_belong_to_the_thread_that_missed(caches: Any) -> None:
    cache = caches["default"]
    k = key("threaded")
    assert cache.get(k) is None
    overtake(caches, k)
    done = threading.Event()

    def other() -> None:
        # Another thread never missed on k: its set is checked from its own call only.
        cache.set(k, "from another thread")
        done.set()

    threading.Thread(target=other).start()
    assert done.wait(30)
    assert cache.get(k) == "from another thread"


def test_a_delete_by_this_thread_ends_its_reservation(caches: Any) -> None:
    cache = caches["default"]
    k = key("deleted")
    assert cache.get(k) is None
    cache.delete(k)
    cache.set(k, "after my own delete")
    assert cache.get(k) == "after my own delete"


def test_get_or_load_with_tags_and_data_versions(caches: Any) -> None:
    cache = caches["default"]
    k = key("post")
    calls: list[int] = []

    def load(v: int) -> Any:
        def f() -> str:
            calls.append(v)
            return f"body v{v}"

        return f

    tag = key("author")
    assert cache.get_or_load(k, load(1), tags=[tag], data_version=1) == "body v1"
    assert cache.get_or_load(k, load(1), tags=[tag], data_version=1) == "body v1"
    assert calls == [1]
    caches["b"].invalidate_tag(tag)
    wait_for("the tag purge from node b", lambda: cache.get(k) is None)
    # A write at data version 3 elsewhere: a load that read version 2 is returned, not cached.
    caches["b"].invalidate_key(k, data_version=3)
    marker = key("marker")
    cache.client.set(marker, b"m")
    caches["b"].client.delete([marker])
    wait_for("node a to apply the versioned invalidation", lambda: not cache.client.get(marker).found)
    assert cache.get_or_load(k, load(2), tags=[tag], data_version=2) == "body v2"
    assert cache.get(k) is None, "a load below the key's version floor was cached"
    assert cache.get_or_load(k, load(3), tags=[tag], data_version=3) == "body v3"
    assert cache.get(k) == "body v3"


def test_prefix_purges_use_django_keys(caches: Any) -> None:
    cache = caches["default"]
    p = key("user")
    cache.set(f"{p}:1:profile", 1)
    cache.set(f"{p}:2:profile", 2)
    cache.set(key("other"), 3)
    caches["b"].invalidate_prefix(f"{p}:")
    wait_for("the prefix purge", lambda: cache.get_many([f"{p}:1:profile", f"{p}:2:profile"]) == {})


def test_the_async_api(caches: Any) -> None:
    cache = caches["default"]

    async def run() -> None:
        k = key("async")
        assert await cache.aget(k) is None
        await cache.aset(k, {"a": 1})
        assert await cache.aget(k) == {"a": 1}
        assert await cache.aadd(k, "x") is False
        assert await cache.ahas_key(k)
        n = key("n")
        await cache.aset(n, 10)
        assert await cache.aincr(n, 5) == 15
        assert await cache.adecr(n) == 14
        with pytest.raises(ValueError):
            await cache.aincr(key("missing"))
        assert await cache.atouch(k, 100)
        await cache.aset_many({k + "1": 1, k + "2": 2})
        assert await cache.aget_many([k + "1", k + "2", k + "3"]) == {k + "1": 1, k + "2": 2}
        await cache.adelete_many([k + "1", k + "2"])
        assert await cache.aget_many([k + "1", k + "2"]) == {}
        assert await cache.adelete(k) is True
        assert await cache.aget_or_set(k, lambda: "made") == "made"
        assert await cache.aget(k) == "made"

        # The stale-set race in a task: the reservation is the task's own.
        r = key("task-race")
        assert await cache.aget(r) is None
        await asyncio.to_thread(overtake, caches, r)
        await cache.aset(r, "stale")
        assert await cache.aget(r) is None

    asyncio.run(run())
