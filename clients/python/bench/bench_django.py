"""Django cache backends side by side, from one Python process, in one run: LocMemCache,
django-redis (the redis-server at 127.0.0.1:6379), and InvalbusCache with and without its
in-process layer (L1), the node reached over a Unix socket. Starts its own nats-server and node.

    python clients/python/bench/bench_django.py [--quick] [--json FILE]

For each backend: `get` of a present key (p50, p99), `set` (p50, p99), `get_many` of 10 present
keys (p50, p99), in microseconds, each call timed alone with `time.perf_counter_ns`. Values are a
small dict (~120 bytes pickled). The keys are warmed first (so the L1 holds them). Prints a
Markdown table (the one in BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from cluster import TOKEN, Cluster

KEYS = 1000


def pct(samples: list[int], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * p))] / 1000.0


def measure(cache: Any, n_get: int, n_set: int, n_many: int) -> dict[str, float]:
    value = {"title": "Hello, world", "author": 42, "tags": ["a", "b", "c"], "body": "x" * 40}
    keys = [f"bench:{i}" for i in range(KEYS)]
    for k in keys:
        cache.set(k, value)
    for k in keys:  # warm: the L1 fills on the first read
        assert cache.get(k) == value, f"{k} not readable after set"
    rng = random.Random(7)
    get_ns = []
    for _ in range(n_get):
        k = keys[rng.randrange(KEYS)]
        t = time.perf_counter_ns()
        v = cache.get(k)
        get_ns.append(time.perf_counter_ns() - t)
        assert v is not None
    set_ns = []
    for i in range(n_set):
        k = keys[i % KEYS]
        t = time.perf_counter_ns()
        cache.set(k, value)
        set_ns.append(time.perf_counter_ns() - t)
    for k in keys:
        cache.get(k)
    many_ns = []
    for _ in range(n_many):
        batch = [keys[rng.randrange(KEYS)] for _ in range(10)]
        t = time.perf_counter_ns()
        got = cache.get_many(batch)
        many_ns.append(time.perf_counter_ns() - t)
        assert len(got) == len(set(batch))
    return {
        "get_p50_us": pct(get_ns, 0.50),
        "get_p99_us": pct(get_ns, 0.99),
        "get_mean_us": statistics.fmean(get_ns) / 1000.0,
        "set_p50_us": pct(set_ns, 0.50),
        "set_p99_us": pct(set_ns, 0.99),
        "get_many10_p50_us": pct(many_ns, 0.50),
        "get_many10_p99_us": pct(many_ns, 0.99),
    }


def redis_up() -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", 6379)) == 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    p.add_argument("--json", type=Path, help="also write the figures as JSON")
    a = p.parse_args()
    n_get, n_set, n_many = (2000, 200, 500) if a.quick else (50_000, 3_000, 10_000)
    with Cluster() as c:
        node = c.node("bench-1", ttl_secs=600)
        import django
        from django.conf import settings

        inv = {"BACKEND": "invalbus.django.InvalbusCache", "LOCATION": node.address}
        caches: dict[str, dict[str, Any]] = {
            "default": {
                "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
                "LOCATION": "bench",
                "OPTIONS": {"MAX_ENTRIES": 10 * KEYS},
            },
            "invalbus_l1": {**inv, "OPTIONS": {"TOKEN": TOKEN, "LOCAL_MAX_ENTRIES": 10_000}},
            "invalbus": {**inv, "OPTIONS": {"TOKEN": TOKEN, "LOCAL_MAX_ENTRIES": 0}},
            "invalbus_rs": {
                **inv,
                "OPTIONS": {"TOKEN": TOKEN, "LOCAL_MAX_ENTRIES": 0, "READ_SOCKET": node.read_address},
            },
        }
        have_redis = redis_up()
        if have_redis:
            caches["redis"] = {
                "BACKEND": "django_redis.cache.RedisCache",
                "LOCATION": "redis://127.0.0.1:6379/15",
                "KEY_PREFIX": f"invalbus-bench-{time.time_ns()}",
            }
        settings.configure(CACHES=caches, INSTALLED_APPS=[])
        django.setup()
        from django.core.cache import caches as django_caches

        names = [
            ("LocMemCache", "default"),
            ("django-redis (TCP, local redis-server)", "redis"),
            ("InvalbusCache with L1", "invalbus_l1"),
            ("InvalbusCache without L1 (gRPC, Unix socket)", "invalbus"),
            ("InvalbusCache without L1 (read socket)", "invalbus_rs"),
        ]
        results: dict[str, dict[str, float]] = {}
        for label, alias in names:
            if alias == "redis" and not have_redis:
                print("bench: no redis-server on 127.0.0.1:6379: django-redis skipped", file=sys.stderr)
                continue
            cache = django_caches[alias]
            if alias == "invalbus_l1":
                deadline = time.monotonic() + 30
                while not cache.local.serving() and time.monotonic() < deadline:
                    time.sleep(0.01)
            print(f"bench: {label}", file=sys.stderr)
            results[label] = measure(cache, n_get, n_set, n_many)
            if alias == "invalbus_l1":
                results[label]["l1_hit_ratio"] = cache.local.hits / max(1, cache.local.hits + cache.local.misses)
            if alias == "redis":
                cache.clear()
    print(f"\nsamples: get {n_get}, set {n_set}, get_many(10) {n_many}; µs\n")
    print("| backend | get p50 | get p99 | set p50 | set p99 | get_many(10) p50 | get_many(10) p99 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, r in results.items():
        print(
            f"| {label} | {r['get_p50_us']:.1f} | {r['get_p99_us']:.1f} | {r['set_p50_us']:.1f} | "
            f"{r['set_p99_us']:.1f} | {r['get_many10_p50_us']:.1f} | {r['get_many10_p99_us']:.1f} |"
        )
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
