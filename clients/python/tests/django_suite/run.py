"""Runs Django's cache test suite against InvalbusCache on a real node over a real nats-server.

    python tests/django_suite/run.py DJANGO_TESTS_DIR [--local]

DJANGO_TESTS_DIR is the `tests` directory of Django's source distribution (the one holding
`cache/tests.py`); `--local` turns the in-process layer on. Prints Django's runner output and
exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from cluster import TOKEN, Cluster  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("django_tests", type=Path)
    p.add_argument("--local", action="store_true", help="with the in-process layer (L1)")
    a = p.parse_args()
    if not (a.django_tests / "cache" / "tests.py").exists():
        print(f"run.py: {a.django_tests}/cache/tests.py not found", file=sys.stderr)
        return 2
    c = Cluster()
    try:
        # Django's suite checks the cache API, not coherence (the coherence checker does that):
        # a read right after a write must hit. A node that briefly lacks fresh evidence (its
        # heartbeat late through the stream on this busy machine) sends reads to the loader, which
        # the suite would count as a failure, so this node may serve a little longer without it.
        node = c.node("django-suite", ttl_secs=600, max_staleness_ms=5000)
        os.environ["INVALBUS_LOCATION"] = node.address
        os.environ["INVALBUS_TOKEN"] = TOKEN
        os.environ["INVALBUS_LOCAL_MAX_ENTRIES"] = "10000" if a.local else "0"
        # Without the L1, reads go through the node's read socket (with it, through gRPC).
        os.environ["INVALBUS_READ_SOCKET"] = "" if a.local else node.read_address
        os.environ["DJANGO_SETTINGS_MODULE"] = "settings"
        sys.path[:0] = [str(HERE), str(a.django_tests.resolve())]
        import django
        from django.test.utils import get_runner

        django.setup()
        from django.conf import settings

        runner = get_runner(settings)(verbosity=1, interactive=False)
        failures = runner.run_tests(["suite_invalbus_backend"])
        return 1 if failures else 0
    finally:
        c.close()


if __name__ == "__main__":
    sys.exit(main())
