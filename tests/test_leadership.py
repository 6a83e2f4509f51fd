"""The leadership monitor over a real scheduler and the real SQLite store, on the real clock.

The store subclass below only adds gates: a pass can be held inside a store call, to put
the scheduler exactly where the faults of a real cluster put it (fenced out mid-pass,
or stuck on a store that does not answer).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest

from distcrond.clock import Clock
from distcrond.config.loader import LoadedConfig
from distcrond.config.models import JobSpec, NodeSpec
from distcrond.coordination.base import FencedOut, PeerInfo
from distcrond.coordination.sqlite import SQLiteCoordinationStore
from distcrond.leadership import LeadershipMonitor
from distcrond.reporting.sqlite import SQLiteReportStore
from distcrond.runs import RunRecord
from distcrond.scheduling.scheduler import Scheduler

pytestmark = pytest.mark.timeout(60)
T = TypeVar("T")
STALL = 1.0  # seconds: the monitors' stall timeout here


def wait_for(condition: Callable[[], T], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)
    return value


class GatedStore(SQLiteCoordinationStore):
    """The SQLite store, with gates a test can close on two of the scheduler's calls."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.fence_next = threading.Event()  # the next record_runs waits, then is fenced out
        self.hang_cursors = threading.Event()  # cursors() (a pass's first read) waits
        self.entered = threading.Event()
        self.release = threading.Event()
        self.resigned: list[int] = []

    def record_runs(
        self, epoch: int, runs: Sequence[RunRecord], cursors: dict[str, datetime] | None = None
    ) -> list[RunRecord]:
        if self.fence_next.is_set():
            self.fence_next.clear()
            self.entered.set()
            self.release.wait(30)
            raise FencedOut(f"epoch {epoch} is stale")
        return super().record_runs(epoch, runs, cursors)

    def cursors(self) -> dict[str, datetime]:
        if self.hang_cursors.is_set():
            self.entered.set()
            self.release.wait(30)
        return super().cursors()

    def resign(self, epoch: int) -> None:
        self.resigned.append(epoch)
        super().resign(epoch)


class Peer:
    """A store, a scheduler with one job every second, and the monitor driving it."""

    def __init__(self, tmp: Path) -> None:
        now = datetime.now(UTC)
        self.store = GatedStore(tmp / "c.sqlite3")
        self.reports = SQLiteReportStore(tmp / "r.sqlite3")
        self.store.register_peer(PeerInfo("p1", "http://x", now, "test"))
        job = JobSpec.model_validate(
            {"id": "tick", "schedule": {"interval": "1s"}, "command": ["/bin/true"]}
        )
        node = NodeSpec.model_validate({"id": "n1", "connection_type": "local"})
        config = LoadedConfig.build({"tick": job}, {"n1": node})
        self.scheduler = Scheduler(
            self.store,
            self.reports,
            lambda: config,
            Clock(),
            ["local"],
            on_fenced=lambda epoch: self.monitor.fenced(epoch),
        )
        self.monitor = LeadershipMonitor(
            self.scheduler, self.store, "p1", Clock(), stall_timeout=STALL
        )
        self.monitor.start()

    def elect(self) -> int:
        self.store.start_election("p1", self.monitor)
        return self.wait_pass(self.store.leader().epoch)  # type: ignore[union-attr]

    def wait_pass(self, epoch: int, timeout: float = 10.0) -> int:
        """Wait until a pass of ``epoch`` completed; the epoch."""
        wait_for(
            lambda: self.scheduler.last_pass[0] == epoch and self.scheduler.last_pass[1],
            timeout,
            f"a completed pass of epoch {epoch}",
        )
        return epoch

    def close(self) -> None:
        self.store.release.set()
        self.monitor.close()
        self.store.close()
        self.reports.close()


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[Peer]:
    p = Peer(tmp_path)
    yield p
    p.close()


def returns_within(call: Callable[[], Any], seconds: float) -> bool:
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive()


def test_a_revoke_during_a_pass_fenced_out_never_waits_and_the_next_term_schedules(
    peer: Peer,
) -> None:
    epoch = peer.elect()
    peer.store.fence_next.set()
    assert peer.store.entered.wait(5), "a pass reached its fenced write"

    # The store's callback thread revokes while the pass is inside its write; the pass is
    # then fenced out, and its scheduler tells the monitor from its own thread.
    assert returns_within(peer.monitor.revoke_leadership, 0.5)
    peer.store.release.set()
    wait_for(lambda: not peer.scheduler.running, 5, "the fenced scheduler to stop")
    assert peer.monitor.epoch is None

    # The store's election goes on: a new epoch (on its callback thread, which nothing
    # above held up), and that term schedules.
    peer.store.resign(epoch)
    peer.wait_pass(epoch + 1, timeout=5)
    assert peer.monitor.epoch == epoch + 1


def test_a_fenced_out_term_ends_without_a_revoke_and_a_stale_fence_ends_nothing(
    peer: Peer,
) -> None:
    epoch = peer.elect()
    peer.store.fence_next.set()
    peer.store.release.set()
    # The term ends (epoch None) first, then its scheduler is stopped (joined).
    wait_for(
        lambda: peer.monitor.epoch is None and not peer.scheduler.running,
        5,
        "the fenced-out term to end and its scheduler to stop",
    )

    peer.store.resign(epoch)  # the store's next epoch
    peer.wait_pass(epoch + 1)
    peer.monitor.fenced(epoch)  # news of the old term, arriving late
    wait_for(peer.monitor._transitions.empty, 5, "the monitor to take the fence")
    # Had it ended the term, its scheduler would have stopped before another pass.
    _, last = peer.scheduler.last_pass
    wait_for(lambda: (peer.scheduler.last_pass[1] or 0) > (last or 0), 5, "a newer pass")
    assert peer.monitor.epoch == epoch + 1 and peer.scheduler.running


def test_a_leader_whose_passes_stop_resigns_after_the_stall_timeout_and_schedules_again(
    peer: Peer, caplog: pytest.LogCaptureFixture
) -> None:
    epoch = peer.elect()
    peer.store.entered.clear()
    peer.store.hang_cursors.set()
    peer.store.release.clear()
    # The store answers no more (a pass reads cursors at the start of each term only, so
    # make the next term's first pass hang): resign, and the pass hangs on.
    peer.store.resign(epoch)
    assert peer.store.entered.wait(5)
    stuck_epoch = epoch + 1
    started = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="distcrond.leadership"):
        wait_for(
            lambda: stuck_epoch in peer.store.resigned, STALL + 3, "the stalled leader to resign"
        )
    assert time.monotonic() - started >= STALL * 0.9
    assert any(
        f"leader stalled: no scheduler pass of epoch {stuck_epoch} completed" in r.getMessage()
        for r in caplog.records
    )

    # The store answers again: the stuck pass ends, and a later term schedules.
    peer.store.hang_cursors.clear()
    peer.store.release.set()
    wait_for(
        lambda: (
            (peer.monitor.epoch or 0) > stuck_epoch
            and peer.scheduler.last_pass[0] == peer.monitor.epoch
            and peer.scheduler.last_pass[1]
        ),
        STALL * 3 + 5,
        "a later term's first pass",
    )


def test_the_leader_publishes_its_newest_pass_for_every_peers_health_check(peer: Peer) -> None:
    before = datetime.now(UTC)
    epoch = peer.elect()
    published = wait_for(peer.store.scheduler_pass, 5, "a published pass")
    assert (published.peer_id, published.epoch, published.stall_timeout) == ("p1", epoch, STALL)
    assert before <= published.at <= datetime.now(UTC)
    first = published.at
    later = wait_for(
        lambda: (p := peer.store.scheduler_pass()) is not None and p.at > first and p,
        5,
        "a newer pass published",
    )
    assert later.epoch == epoch


def test_close_stops_the_scheduler_and_ignores_later_news(peer: Peer) -> None:
    epoch = peer.elect()
    peer.monitor.close()
    assert not peer.scheduler.running and peer.monitor.epoch is None
    assert peer.monitor._thread is not None and not peer.monitor._thread.is_alive()
    peer.monitor.establish_leadership(epoch + 1)  # queued for a thread that has ended
    assert not peer.scheduler.running and peer.monitor.epoch is None
