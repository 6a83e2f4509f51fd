"""Peers that are live on record but start nothing: paused, cut off, or swamped.

A peer's session outlives its process's ability to work: a peer paused
(SIGSTOP, a VM stall) or cut off from the network keeps its session, and so
its place among the live peers, until the session expires (``--zk-session-timeout``).
Meanwhile the runs assigned to it wait, and the next slots of their jobs are
skipped by their concurrency policy: with a few dozen one-second jobs spread
over three peers, within seconds almost every job has a run stuck on that peer,
and the whole cluster runs nearly nothing (the chaos suite's follower pause).

So the leader suspects a peer that holds an assigned run more than
``overdue`` after it was due (its slot, or when it was recorded, if later: a
caught-up slot is due when recorded) and not claimed: a live executor claims
a due run within milliseconds. A run is not overdue for the time the leader itself
could not reach the store (``CoordinationStore.reconnected_at``): a ZooKeeper
server's loss cuts every peer off at once. A suspect gets no new runs for ``hold`` seconds,
and its overdue runs move to another peer (a compare-and-set on the run's
record: if it claims the run meanwhile, the move fails, and if the move wins,
its late claim fails, so a run never starts twice). After ``hold`` it gets
runs again; if it is still stuck, it is suspected again a second later.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

from distcrond.clock import Clock
from distcrond.runs import RunRecord, RunState

OVERDUE = timedelta(seconds=1)
HOLD_S = 5.0


def overdue(
    record: RunRecord,
    now: datetime,
    after: timedelta = OVERDUE,
    since: datetime | None = None,
) -> bool:
    """Whether ``record`` is assigned and not claimed ``after`` past when it was due, or
    past ``since`` if later (when the leader's connection to the store came back: a loss
    of a ZooKeeper server cuts every peer off at once, and none of them is to blame)."""
    if record.state is not RunState.ASSIGNED:
        return False
    due = max(record.slot, record.created_at or record.slot, since or record.slot)
    return now - due > after


class SuspectPeers:
    """The peers suspected of starting nothing, each until its hold ends (not thread-safe:
    the scheduler's thread alone uses it)."""

    def __init__(self, clock: Clock, hold: float = HOLD_S) -> None:
        self._clock = clock
        self._hold = hold
        self._until: dict[str, float] = {}

    def suspect(self, peers: Iterable[str]) -> list[str]:
        """Suspect ``peers`` (again); the ones that were not suspects before."""
        now = self._clock.monotonic()
        new = [p for p in peers if self._until.get(p, 0.0) <= now]
        for peer in peers:
            self._until[peer] = now + self._hold
        return new

    def current(self) -> set[str]:
        now = self._clock.monotonic()
        for peer in [p for p, until in self._until.items() if until <= now]:
            del self._until[peer]
        return set(self._until)

    def unsuspected(self, live: list[str]) -> list[str]:
        """The live peers not suspected (runs move only to these)."""
        suspects = self.current()
        return [p for p in live if p not in suspects]

    def eligible(self, live: list[str]) -> list[str]:
        """The live peers that may get new runs: the unsuspected ones, or all if none is."""
        return self.unsuspected(live) or live
