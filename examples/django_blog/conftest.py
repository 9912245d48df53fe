"""Runs the example project against a real node on a real nats-server (the fixtures of
clients/python/tests/cluster.py) with a throwaway SQLite database."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "clients" / "python" / "tests")]

from cluster import TOKEN, Cluster, Node  # noqa: E402


@pytest.fixture(scope="session")
def blog_node() -> Iterator[Node]:
    c = Cluster()
    tmp = tempfile.TemporaryDirectory()
    try:
        node = c.node("blog-1")
        os.environ["INVALBUS_LOCATION"] = node.address
        os.environ["INVALBUS_TOKEN"] = TOKEN
        os.environ["BLOG_DB"] = str(Path(tmp.name) / "blog.sqlite3")
        os.environ["DJANGO_SETTINGS_MODULE"] = "blogsite.settings"
        import django
        from django.core.management import call_command

        django.setup()
        call_command("migrate", verbosity=0)
        yield node
    finally:
        c.close()
        tmp.cleanup()
