"""The in-process layer (L1) against real nodes: it serves what its node served, drops what any
node invalidates, refuses copies an event overtook, and stops serving when its stream breaks or
its node stops vouching (a cut NATS link)."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator

import pytest
from cluster import TOKEN, Cluster, Node, peers_connected, wait_for

from invalbus import Client, LocalLayer


def key(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def layer(two_nodes: tuple[object, Node, Node]) -> Iterator[LocalLayer]:
    _, a, _ = two_nodes
    l1 = LocalLayer(Client(a.address, token=TOKEN), 1000)
    wait_for("the L1 to serve", l1.serving)
    yield l1
    l1.close()


def read_through(l1: LocalLayer, c: Client, k: str) -> bytes | None:
    v = l1.get(k)
    if v is not None:
        return v
    since = l1.begin()
    e = c.get(k)
    if not e.found:
        return None
    l1.put(k, e.value, e.tags, e.ttl_ms, since)
    return e.value


def test_copies_are_dropped_by_any_nodes_invalidations(two_nodes: tuple[object, Node, Node], layer: LocalLayer) -> None:
    _, a, b = two_nodes
    ca, cb = a.client(), b.client()
    k, t, p = key("k"), key("tag"), key("prefix")
    ca.set(k, b"v1")
    ca.set(t + "-entry", b"tagged", tags=[t])
    ca.set(p + ":1", b"under prefix")
    for x in (k, t + "-entry", p + ":1"):
        assert read_through(layer, ca, x) is not None
        assert layer.get(x) is not None, "the L1 keeps what its node served"
    cb.delete([k])
    wait_for("the L1 to drop a key deleted through the other node", lambda: layer.get(k) is None)
    cb.invalidate_tag(t)
    wait_for("the L1 to drop a tag purged through the other node", lambda: layer.get(t + "-entry") is None)
    cb.invalidate_prefix(p)
    wait_for("the L1 to drop a prefix purged through the other node", lambda: layer.get(p + ":1") is None)
    ca.set(k, b"v2")
    assert read_through(layer, ca, k) == b"v2"
    cb.invalidate_all()
    wait_for("the L1 to drop everything on a flush", lambda: layer.get(k) is None)


def test_a_copy_overtaken_by_an_event_is_not_kept(two_nodes: tuple[object, Node, Node], layer: LocalLayer) -> None:
    _, a, b = two_nodes
    ca, cb = a.client(), b.client()
    k = key("k")
    ca.set(k, b"old")
    since = layer.begin()
    e = ca.get(k)  # the read starts before the other node's delete ...
    marker = key("marker")
    ca.set(marker, b"m")
    assert read_through(layer, ca, marker) == b"m"
    cb.delete([k])
    cb.delete([marker])
    wait_for("the L1 to see the deletes", lambda: layer.get(marker) is None)
    # ... and its answer is offered to the L1 after the delete's event arrived: refused.
    assert layer.put(k, e.value, e.tags, e.ttl_ms, since) is False
    assert layer.get(k) is None


def test_the_layer_stops_serving_when_its_node_is_cut_off_and_when_the_stream_breaks() -> None:
    with Cluster() as c:
        w = c.node("l1-writer")
        r = c.node("l1-reader", via_proxy=True)
        wait_for("the nodes to see each other", lambda: peers_connected(w, r) and peers_connected(r, w))
        l1 = LocalLayer(Client(r.address, token=TOKEN), 100)
        cr = r.client()
        wait_for("the L1 to serve", l1.serving)
        k = key("k")
        cr.set(k, b"v")
        assert read_through(l1, cr, k) == b"v" and l1.get(k) == b"v"
        r.proxy.cut()  # type: ignore[attr-defined]
        # The node stops vouching within its bound (~2 s); the L1 stops with it.
        wait_for("the L1 to stop serving while its node is cut off", lambda: not l1.serving(), 30)
        assert l1.get(k) is None
        r.proxy.heal()  # type: ignore[attr-defined]
        wait_for("the L1 to serve again after the heal", l1.serving, 60)
        assert l1.get(k) is None, "the L1 kept a copy across an outage"
        # The stream breaks (the node stops): the L1 stops at once.
        assert read_through(l1, cr, k) in (b"v", None)
        started = time.monotonic()
        r.stop()
        # An open Watch stream must not hold up the node's shutdown (its server waits for
        # running calls for up to 15 s).
        assert time.monotonic() - started < 10, "the node took long to stop with a Watch stream open"
        wait_for("the L1 to stop serving when its stream breaks", lambda: not l1.serving(), 30)
        assert l1.get(k) is None
        l1.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_layer_made_before_fork_starts_its_own_stream_in_the_child(two_nodes: tuple[object, Node, Node]) -> None:
    _, a, _ = two_nodes
    l1 = LocalLayer(Client(a.address, token=TOKEN), 100)  # built in the "master", not used
    ca = a.client()
    k = key("fork")
    ca.set(k, b"v")
    pid = os.fork()
    if pid == 0:
        ok = False
        try:
            wait_for("the child's L1 to serve", l1.serving, 30)
            ok = read_through(l1, ca, k) == b"v" and l1.get(k) == b"v"
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
