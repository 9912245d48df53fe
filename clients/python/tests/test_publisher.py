"""The NATS publisher (invalbus.publisher and examples/python/publish.py) against a real node."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid

import pytest
from cluster import REPO, Node, cluster, wait_for

from invalbus.publisher import Publisher, PublishError, invalidation, new_seed, public_key


def test_a_published_batch_is_applied_by_the_node(two_nodes: tuple[object, Node, Node]) -> None:
    cluster, a, b = two_nodes
    ca, cb = a.client(), b.client()
    k, tagged = f"pub-{uuid.uuid4().hex[:8]}", f"pub-t-{uuid.uuid4().hex[:8]}"
    ca.set(k, b"v1", version=1)
    cb.set(tagged, b"x", tags=["author:7"])

    async def run() -> None:
        pub = await Publisher.connect(cluster.nats.url, namespace=cluster.namespace)  # type: ignore[attr-defined]
        async with pub:
            ack = await pub.publish([invalidation(cache="default", key=k, version=2)], ack=True)
            assert ack.seq > 0
            await pub.publish([invalidation(tag="author:7", reason="from pytest")])
            assert pub.seq == 2
        with pytest.raises(ValueError):
            invalidation(key="a", tag="b")

    asyncio.run(run())
    wait_for("node a to apply the published key invalidation", lambda: not ca.get(k).found)
    assert ca.set(k, b"v1", version=1) is False, "a fill below the published version was accepted"
    wait_for("node b to apply the published tag purge", lambda: not cb.get(tagged).found)


def test_the_example_script(two_nodes: tuple[object, Node, Node]) -> None:
    cluster, a, _ = two_nodes
    ca = a.client()
    k = f"script-{uuid.uuid4().hex[:8]}"
    ca.set(k, b"v")
    script = REPO / "examples" / "python" / "publish.py"
    ns = cluster.namespace  # type: ignore[attr-defined]
    url = cluster.nats.url  # type: ignore[attr-defined]
    out = subprocess.run(
        [sys.executable, script, "--nats", url, "--namespace", ns, "--key", k, "--ack"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "published 1 invalidation(s)" in out.stdout
    wait_for("the node to apply the script's batch", lambda: not ca.get(k).found)
    bad = subprocess.run([sys.executable, script, "--nats", url], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "nothing to invalidate" in bad.stderr


def test_no_stream_is_a_publish_error(two_nodes: tuple[object, Node, Node]) -> None:
    cluster, _, _ = two_nodes

    async def run() -> None:
        pub = await Publisher.connect(cluster.nats.url, namespace="no-such-namespace")  # type: ignore[attr-defined]
        async with pub:
            with pytest.raises(PublishError, match="no JetStream stream"):
                await pub.publish([invalidation(tag="t")], ack=True)

    asyncio.run(run())


def test_a_node_with_a_key_list_applies_only_the_publishers_it_trusts(tmp_path: object) -> None:
    """Signed end to end: a node whose `[trust]` lists this publisher's key (for its origin,
    key invalidations only) applies its batches; an unlisted key, and a purge beyond the key's
    scopes, are refused and change nothing."""
    node_seed, trusted_seed, stranger_seed = new_seed(), new_seed(), new_seed()
    with cluster() as c:
        key_file = c.dir / "node.nk"
        key_file.write_bytes(node_seed + b"\n")
        extra = (
            f'[identity]\nkey_file = "{key_file}"\n'
            f'[trust]\nmode = "keys"\n'
            f'[[trust.keys]]\nkey = "{public_key(node_seed)}"\norigins = ["keyed"]\n'
            f'[[trust.keys]]\nkey = "{public_key(trusted_seed)}"\nscopes = ["keys"]\norigins = ["py-trusted"]\n'
        )
        node = c.node("keyed", extra_toml=extra)
        client = node.client()
        for k in ("by-stranger", "by-trusted", "tagged"):
            assert client.set(k, b"v", tags=["t"])

        async def run() -> None:
            url, ns = c.nats.url, c.namespace  # type: ignore[attr-defined]
            stranger = await Publisher.connect(url, namespace=ns, origin="py-trusted", seed=stranger_seed)
            async with stranger:
                await stranger.publish([invalidation(cache="default", key="by-stranger")], ack=True)
            trusted = await Publisher.connect(url, namespace=ns, origin="py-trusted", seed=trusted_seed)
            async with trusted:
                await trusted.publish([invalidation(cache="default", tag="t")], ack=True)
                await trusted.publish([invalidation(cache="default", key="by-trusted")], ack=True)

        asyncio.run(run())
        wait_for("the trusted publisher's key invalidation", lambda: not client.get("by-trusted").found)
        assert client.get("by-stranger").found, "a batch signed by an unlisted key was applied"
        assert client.get("tagged").found, "a tag purge by a key allowed keys only was applied"
