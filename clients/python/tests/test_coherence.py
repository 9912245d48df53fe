"""The coherence checker (coherence.py) as tests: writers through one process, readers in other
processes on other nodes, one reader node's NATS link cut mid-run; no read may be stale beyond
the stated bound. The incoherent control shows the checker catches stale reads."""

from __future__ import annotations

import pytest
from coherence import run


@pytest.mark.parametrize("l1", [False, True], ids=["without-l1", "with-l1"])
def test_no_stale_read_beyond_the_bound_with_a_fault(l1: bool) -> None:
    s = run(8.0, l1=l1, fault=True)
    print(s.line())
    assert s.reads > 200 and s.writes > 50, s.line()
    assert s.reads_during_fault > 0, "no read happened while the link was cut: " + s.line()
    assert s.stale_beyond_bound == 0, s.line()


def test_the_checker_catches_an_incoherent_cache() -> None:
    # Long enough that a value kept from the start is older than the bound by the end.
    s = run(8.0, l1=False, fault=False, incoherent=True)
    print(s.line())
    assert s.stale_beyond_bound > 0, "the checker missed stale reads: " + s.line()
