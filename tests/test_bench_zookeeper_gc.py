# ruff: noqa: E501 (gc.log lines as the JVM writes them)
"""The cluster benchmark's reading of the ZooKeeper servers' gc.log."""

from __future__ import annotations

from datetime import datetime

from integration.bench.cluster import ZooKeeperGC, gc_waits

LOG = """\
[2026-11-27T21:22:51.191+0000][1.522s][gc,phases] GC(0) Pause Mark Start 0.007ms
[2026-11-27T21:22:51.200+0000][1.530s][gc,phases] GC(0) Concurrent Mark 8.118ms
[2026-11-27T21:23:43.715+0000][54.046s][gc       ] Allocation Stall (CommitProcessor:1) 3.185ms
[2026-11-27T21:23:43.715+0000][54.046s][gc       ] Allocation Stall (QuorumPeer[myid=1](plain=127.0.0.1:2381)(secure=disabled)) 7.118ms
[2026-11-27T21:23:43.979+0000][54.310s][gc       ] GC(6) Garbage Collection (Allocation Stall) 66M(26%)->38M(15%)
[2026-11-27T21:23:44.001+0000][54.332s][gc,phases] GC(6) Pause Mark End 0.213ms
[2026-11-27T21:23:50.001+0000][60.332s][gc,phases] GC(7) Pause Relocate Start 0.5ms
"""


def ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def test_pauses_and_allocation_stalls_in_the_window_are_counted_with_the_longest() -> None:
    lo, hi = ts("2026-11-27T21:23:00+00:00"), ts("2026-11-27T21:23:50+00:00")
    # Only the Pause and Allocation Stall lines stop a thread; concurrent phases and a
    # cycle's summary (whose cause is named "Allocation Stall") do not; 21:23:50 is out.
    assert gc_waits(LOG.splitlines(), lo, hi) == ZooKeeperGC(1, 0.213, 2, 7.118)


def test_a_window_without_collections_has_none() -> None:
    lo = ts("2026-11-27T22:00:00+00:00")
    assert gc_waits(LOG.splitlines(), lo, lo + 60) == ZooKeeperGC(0, 0.0, 0, 0.0)
