"""The typed client against real nodes: every call, its errors, and the stale-set race."""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest
from cluster import TOKEN, Node, wait_for

from invalbus import (
    AsyncClient,
    AuthError,
    Client,
    IntegerOverflow,
    InvalidArgument,
    KeyNotFound,
    NotAnInteger,
    SetItem,
)


def key(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def test_every_call_over_a_unix_socket_and_tcp(two_nodes: tuple[object, Node, Node]) -> None:
    _, a, b = two_nodes
    assert a.address.startswith("unix:") and not b.address.startswith("unix:")
    for node in (a, b):
        c = node.client()
        k = key("k")
        assert c.get(k).found is False
        assert c.set(k, b"v1", tags=["t1"], version=3, ttl=60) is True
        e = c.get(k)
        assert (e.found, e.value, e.tags, e.version) == (True, b"v1", ("t1",), 3)
        assert 0 < e.ttl_ms <= 60_000
        assert c.add(k, b"other") is False
        assert c.get(k).value == b"v1"
        k2 = key("added")
        assert c.add(k2, b"new") is True
        assert c.get(k2).value == b"new"
        n = key("n")
        c.set(n, b"41", tags=["counter"])
        assert c.incr(n) == 42
        assert c.incr(n, -50) == -8
        assert c.get(n).value == b"-8"
        assert c.get(n).tags == ("counter",), "incr keeps the entry's tags"
        with pytest.raises(KeyNotFound):
            c.incr(key("missing"))
        c.set(k2, b"\x80not a number")
        with pytest.raises(NotAnInteger):
            c.incr(k2)
        c.set(n, str(2**63 - 1).encode())
        with pytest.raises(IntegerOverflow):
            c.incr(n)
        assert c.touch(k, ttl=120) is True
        assert c.get(k).ttl_ms > 60_000
        assert c.touch(key("missing"), ttl=1) is False
        assert c.delete([k, key("missing")]) == [True, False]
        assert not c.get(k).found
        ks = [key("m") for _ in range(3)]
        assert c.set_many([SetItem(x, x.encode()) for x in ks]) == [True] * 3
        got = c.get_many([*ks, key("missing")])
        assert [g.value for g in got[:3]] == [x.encode() for x in ks] and not got[3].found
        c.invalidate_all()
        assert not any(g.found for g in c.get_many(ks))
        c.close()


def test_tags_and_prefixes_purge_on_every_node(two_nodes: tuple[object, Node, Node]) -> None:
    _, a, b = two_nodes
    ca, cb = a.client(), b.client()
    t = key("author")
    kb = key("post")
    cb.set(kb, b"body", tags=[t])
    ca.invalidate_tag(t)
    wait_for("a tag purge on node a to reach node b", lambda: not cb.get(kb).found)
    p = key("prefix")
    cb.set(p + ":1", b"x")
    ca.invalidate_prefix(p)
    wait_for("a prefix purge to reach node b", lambda: not cb.get(p + ":1").found)


def test_a_write_on_one_node_invalidates_the_key_on_the_other(two_nodes: tuple[object, Node, Node]) -> None:
    _, a, b = two_nodes
    ca, cb = a.client(), b.client()
    k = key("shared")
    cb.set(k, b"old")
    ca.set(k, b"new")
    assert ca.get(k).value == b"new"
    wait_for("node b to drop its copy after node a's set", lambda: not cb.get(k).found)


def test_bad_input_gets_a_typed_error(two_nodes: tuple[object, Node, Node]) -> None:
    _, a, _ = two_nodes
    c = a.client()
    with pytest.raises(InvalidArgument, match="NUL"):
        c.set(key("k"), b"v", tags=["bad\0tag"])
    with pytest.raises(InvalidArgument, match="NUL"):
        c.invalidate_tag("bad\0tag")
    with pytest.raises(InvalidArgument):
        c.set(key("k"), b"v", tags=[""])
    with pytest.raises(InvalidArgument):
        c.get("")
    with pytest.raises(InvalidArgument, match="unknown cache"):
        Client(a.address, token=TOKEN, cache="nosuch").get("k")
    with pytest.raises(AuthError):
        Client(a.address, token="wrong-token-0123456789").get("k")
    # A reservation names its key: using it for another is refused.
    r = c.get(key("r"), reserve=True).reservation
    with pytest.raises(InvalidArgument, match="reservation is for key"):
        c.set(key("other"), b"v", reservation=r)


def test_stale_set_is_refused_after_a_peer_invalidation(two_nodes: tuple[object, Node, Node]) -> None:
    """The read-through race with the interleaving forced: a miss on node a, the source read
    (old value), a write and invalidation through node b, applied on a, then a's set of the old
    value. With the miss's reservation it is refused; without one (the control) it is cached,
    which is the stale data this guards against."""
    _, a, b = two_nodes
    ca, cb = a.client(), b.client()

    def overtake(k: str) -> None:
        # b's write invalidates k then a marker; a applies batches in order, so once the marker
        # is gone on a, so is k.
        marker = key("marker")
        ca.set(marker, b"m")
        cb.delete([k])
        cb.delete([marker])
        wait_for("node a to apply node b's invalidations", lambda: not ca.get(marker).found)

    k = key("race")
    miss = ca.get(k, reserve=True)
    assert not miss.found and miss.reservation
    overtake(k)
    assert ca.set(k, b"stale", reservation=miss.reservation) is False
    assert not ca.get(k).found, "a value read before a peer's invalidation was cached"

    # The control: the same interleaving without the reservation caches the stale value.
    k = key("race-control")
    ca.get(k, reserve=True)
    overtake(k)
    assert ca.set(k, b"stale") is True
    assert ca.get(k).value == b"stale"

    # Fill (read-through, no publish) is guarded the same way.
    k = key("race-fill")
    r = ca.get_or_reserve(k)
    overtake(k)
    assert ca.fill(r.reservation, b"stale") is False
    assert not ca.get(k).found


def test_a_set_without_reservation_respects_the_version_floor(two_nodes: tuple[object, Node, Node]) -> None:
    _, a, b = two_nodes
    ca, cb = a.client(), b.client()
    k = key("versioned")
    marker = key("marker")
    ca.set(marker, b"m")
    cb.invalidate_key(k, version=5)
    cb.delete([marker])
    wait_for("node a to apply the versioned invalidation", lambda: not ca.get(marker).found)
    assert ca.set(k, b"v4", version=4) is False
    assert ca.set(k, b"v5", version=5) is True


def test_async_client(two_nodes: tuple[object, Node, Node]) -> None:
    _, a, _ = two_nodes

    async def run() -> None:
        c = AsyncClient(a.address, token=TOKEN)
        k = key("async")
        miss = await c.get(k, reserve=True)
        assert miss.reservation
        assert await c.set(k, b"v", reservation=miss.reservation)
        assert (await c.get(k)).value == b"v"
        assert await c.add(k, b"w") is False
        await c.set(k + "n", b"1")
        assert await c.incr(k + "n", 2) == 3
        assert await c.delete([k]) == [True]
        assert [e.found for e in await c.get_many([k, k + "n"])] == [False, True]
        await c.close()

    asyncio.run(run())
    # A second event loop gets its own channel.
    asyncio.run(run())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_client_made_before_fork_opens_its_channel_in_the_child(two_nodes: tuple[object, Node, Node]) -> None:
    """As a pre-fork server does: the master builds the client (settings load) and forks
    workers; each opens its own channel on first use."""
    _, a, _ = two_nodes
    c = a.client()
    k = key("fork")
    pid = os.fork()
    if pid == 0:
        ok = False
        try:
            ok = c.set(k, b"child") and c.get(k).value == b"child"
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert c.get(k).value == b"child"


def test_the_read_socket_answers_as_grpc_does(two_nodes: tuple[object, Node, Node]) -> None:
    from invalbus import ReadSocket

    _, a, _ = two_nodes
    c = a.client()
    rs = ReadSocket(a.read_address, token=TOKEN)
    k = key("rs")
    c.set(k, b"\x80value", tags=["t1", "t2"], version=9, ttl=60)
    hit = rs.get(k)
    assert (hit.found, hit.value, hit.tags, hit.version) == (True, b"\x80value", ("t1", "t2"), 9)
    assert 0 < hit.ttl_ms <= 60_000
    miss = rs.get(key("absent"), reserve=True)
    assert not miss.found and miss.reservation.startswith("rs-")
    assert c.set(key("other"), b"v") is True
    got = rs.get_many([k, key("absent"), k])
    assert [g.found for g in got] == [True, False, True] and got[1].reservation == ""
    # A reservation from the read socket is as good as one from gRPC.
    k2 = key("rs-res")
    r = rs.get(k2, reserve=True).reservation
    assert c.set(k2, b"filled", reservation=r) is True
    assert rs.get(k2).value == b"filled"
    # Refusals: a bad request keeps the connection; a bad token is refused.
    with pytest.raises(InvalidArgument, match="unknown cache"):
        ReadSocket(a.read_address, token=TOKEN, cache="nosuch").get("k")
    with pytest.raises(InvalidArgument):
        rs.get("")
    assert rs.get(k).found
    with pytest.raises(AuthError):
        ReadSocket(a.read_address, token="wrong-token-0123456789").get("k")
    rs.close()
