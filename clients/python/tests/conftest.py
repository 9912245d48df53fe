"""Shared fixtures: one nats-server and two nodes (a Unix socket and TCP) for the whole session.

When a test fails, the end of every node's log (the session's nodes and those the test started
itself) is added to its report, so that a failure in CI says what the nodes saw.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cluster as cluster_module
from cluster import Cluster, Node, peers_connected, serves, wait_for

#: Lines of each node's log added to a failed test's report.
LOG_TAIL_LINES = 150


@pytest.fixture(scope="session")
def two_nodes() -> Iterator[tuple[Cluster, Node, Node]]:
    c = Cluster()
    try:
        a = c.node("py-a")
        b = c.node("py-b", tcp=True)
        wait_for("the two nodes to see each other", lambda: peers_connected(a, b) and peers_connected(b, a))
        wait_for("both nodes to serve from their caches", lambda: serves(a) and serves(b))
        yield c, a, b
    finally:
        c.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if call.when == "setup":
        cluster_module.STOPPED_LOGS.clear()
    if not report.failed:
        return
    logs = list(cluster_module.STOPPED_LOGS)
    for c in cluster_module.OPEN_CLUSTERS:
        logs += [(n.node_id, n.log_text()) for n in c.nodes]
    for node_id, text in logs:
        tail = "\n".join(text.splitlines()[-LOG_TAIL_LINES:])
        report.sections.append((f"node {node_id}: last {LOG_TAIL_LINES} log lines", tail))
