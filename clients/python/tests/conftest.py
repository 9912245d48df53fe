"""Shared fixtures: one nats-server and two nodes (a Unix socket and TCP) for the whole session."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cluster import Cluster, Node, peers_connected, wait_for


@pytest.fixture(scope="session")
def two_nodes() -> Iterator[tuple[Cluster, Node, Node]]:
    c = Cluster()
    try:
        a = c.node("py-a")
        b = c.node("py-b", tcp=True)
        wait_for("the two nodes to see each other", lambda: peers_connected(a, b) and peers_connected(b, a))
        yield c, a, b
    finally:
        c.close()
