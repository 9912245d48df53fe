"""The coherence checker across Python processes: one writer process writes a source of truth and
invalidates through its node; reader processes on other nodes read through the Django backend
(with or without the L1); one reader node's NATS link is cut for a while mid-run. Every read is
checked against the writes whose invalidation had been accepted before it started.

A read of key k that starts at t and returns version x is *stale beyond the bound* if some
version y > x of k was accepted (the writer's call returned) before `t - bound`. With a correct
system there are none: a node stops serving within the node bound of losing NATS, and an L1
within its stream's delivery after that. Reads stale by less than the bound are counted apart.

    python clients/python/tests/coherence.py [--seconds 6] [--l1] [--no-fault] [--incoherent]

`--incoherent` makes the readers keep every value in a process-local dict that nothing
invalidates (what a plain LocMemCache per worker does): the checker must then report stale reads.
Prints one summary line: `coherence: l1=… fault=… reads=… writes=… stale_beyond_bound=… …`.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import pickle
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from cluster import TOKEN, Cluster, peers_connected, wait_for  # noqa: E402

KEYS = 40
#: The node's bound with the node defaults (heartbeat 1 s + max staleness 1 s + a 10 ms tick).
NODE_BOUND = 2.01
#: What the checker allows on top for the Watch stream's delivery and this machine's scheduling
#: (2 shared cores); the README states the L1 bound as node bound + stream delivery.
DELIVERY_ALLOWANCE = 0.5


@dataclass
class Summary:
    l1: bool
    fault: bool
    incoherent: bool
    reads: int
    writes: int
    reads_during_fault: int
    stale_beyond_bound: int
    stale_within_bound: int
    max_staleness_ms: float

    def line(self) -> str:
        return (
            f"coherence: l1={'on' if self.l1 else 'off'} fault={'on' if self.fault else 'off'}"
            f"{' incoherent-control' if self.incoherent else ''} reads={self.reads} writes={self.writes}"
            f" reads_during_fault={self.reads_during_fault} stale_within_bound={self.stale_within_bound}"
            f" max_staleness_ms={self.max_staleness_ms:.0f}"
            f" bound_ms={(NODE_BOUND + DELIVERY_ALLOWANCE) * 1000:.0f} stale_beyond_bound={self.stale_beyond_bound}"
        )


def _django_cache(address: str, l1: bool, write_timeout: float = 35.0) -> Any:
    import django
    from django.conf import settings

    settings.configure(
        CACHES={
            "default": {
                "BACKEND": "invalbus.django.InvalbusCache",
                "LOCATION": address,
                "OPTIONS": {
                    "TOKEN": TOKEN,
                    "LOCAL_MAX_ENTRIES": 10_000 if l1 else 0,
                    "WRITE_TIMEOUT": write_timeout,
                },
            }
        },
        INSTALLED_APPS=[],
    )
    django.setup()
    from django.core.cache import cache

    return cache


def writer(address: str, db: Any, stop: Any, out: str) -> None:
    cache = _django_cache(address, False)
    rng = random.Random(1)
    log: list[tuple[int, int, float]] = []
    while not stop.is_set():
        k = rng.randrange(KEYS)
        with db.get_lock():
            db[k] += 1
            v = db[k]
        # As the model registry does after a commit: invalidate (or write the new value).
        if rng.random() < 0.5:
            cache.delete(f"k{k}")
        else:
            cache.set(f"k{k}", v)
        log.append((k, v, time.monotonic()))
        time.sleep(0.003)
    Path(out).write_bytes(pickle.dumps(log))


def reader(address: str, l1: bool, incoherent: bool, db: Any, stop: Any, seed: int, out: str) -> None:
    from invalbus import InvalbusError

    # A reader's set is a write: while its node is cut off from NATS it fails (after this
    # timeout) and the reader goes on reading.
    cache = _django_cache(address, l1, write_timeout=0.5)
    if l1:
        wait_for("the L1 to serve", cache.local.serving, 30)
    rng = random.Random(seed)
    mine: dict[str, int] = {}
    log: list[tuple[int, int, float]] = []

    def source(k: int) -> int:
        with db.get_lock():
            return int(db[k])

    while not stop.is_set():
        k = rng.randrange(KEYS)
        key = f"k{k}"
        t0 = time.monotonic()
        if incoherent:
            x = mine.get(key)
            if x is None:
                x = mine[key] = source(k)
        elif rng.random() < 0.5:
            # Ordinary Django code: get, read the source on a miss, set.
            x = cache.get(key)
            if x is None:
                x = source(k)
                try:
                    cache.set(key, x)
                except InvalbusError:
                    pass
        else:
            x = cache.get_or_load(key, lambda k=k: source(k))
        log.append((k, int(x), t0))
        # Paced: four readers that hit their L1 would otherwise spin on this 2-core machine and
        # starve the nodes and nats-server they are checking.
        time.sleep(0.0005)
    Path(out).write_bytes(pickle.dumps(log))


def check(
    writes: list[tuple[int, int, float]], reads: list[tuple[int, int, float]], bound: float
) -> tuple[int, int, float]:
    """(stale beyond the bound, stale within it, largest staleness in seconds)."""
    accepted: dict[int, list[tuple[float, int]]] = {}
    for k, v, at in writes:
        accepted.setdefault(k, []).append((at, v))
    for lst in accepted.values():
        lst.sort()
    beyond = within = 0
    worst = 0.0
    for k, x, t0 in reads:
        # The first write of k newer than x accepted before the read started: its age is the
        # read's staleness.
        newer = [at for at, v in accepted.get(k, ()) if v > x and at < t0]
        if not newer:
            continue
        age = t0 - min(newer)
        worst = max(worst, age)
        if age > bound:
            beyond += 1
        else:
            within += 1
    return beyond, within, worst


def run(seconds: float, l1: bool, fault: bool, incoherent: bool = False) -> Summary:
    ctx = mp.get_context("spawn")
    with Cluster() as c:
        w = c.node("coh-writer")
        r1 = c.node("coh-r1", via_proxy=True)
        r2 = c.node("coh-r2", tcp=True)
        for a, b in ((w, r1), (w, r2), (r1, w), (r2, w)):
            wait_for(f"{a.node_id} and {b.node_id} to see each other", lambda a=a, b=b: peers_connected(a, b))
        db = ctx.Array("q", KEYS)
        stop = ctx.Event()
        out = c.dir
        procs = [ctx.Process(target=writer, args=(w.address, db, stop, str(out / "w.pkl")))]
        for i, node in enumerate((r1, r2, r1, r2)):
            procs.append(
                ctx.Process(target=reader, args=(node.address, l1, incoherent, db, stop, i, str(out / f"r{i}.pkl")))
            )
        for p in procs:
            p.start()
        start = time.monotonic()
        fault_window = (start + seconds / 3, start + seconds / 3 + 3.0) if fault else (0.0, 0.0)
        if fault:
            time.sleep(max(0.0, fault_window[0] - time.monotonic()))
            r1.proxy.cut()  # type: ignore[attr-defined]
            time.sleep(max(0.0, fault_window[1] - time.monotonic()))
            r1.proxy.heal()  # type: ignore[attr-defined]
        time.sleep(max(0.0, start + seconds - time.monotonic()))
        stop.set()
        for p in procs:
            p.join(60)
            if p.exitcode != 0:
                raise RuntimeError(f"a checker process failed (exit {p.exitcode}); see its output above")
        writes = pickle.loads((out / "w.pkl").read_bytes())
        reads: list[tuple[int, int, float]] = []
        during = 0
        for i in range(4):
            rs = pickle.loads((out / f"r{i}.pkl").read_bytes())
            reads += rs
            if i in (0, 2):
                during += sum(1 for _, _, t in rs if fault_window[0] <= t < fault_window[1])
    beyond, within, worst = check(writes, reads, NODE_BOUND + DELIVERY_ALLOWANCE)
    return Summary(l1, fault, incoherent, len(reads), len(writes), during, beyond, within, worst * 1000)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--l1", action="store_true")
    p.add_argument("--no-fault", action="store_true")
    p.add_argument("--incoherent", action="store_true")
    a = p.parse_args()
    s = run(a.seconds, a.l1, not a.no_fault, a.incoherent)
    print(s.line())
    return 1 if s.stale_beyond_bound else 0


if __name__ == "__main__":
    sys.exit(main())
