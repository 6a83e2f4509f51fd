"""Leadership as a small state machine: contend → lead(epoch) → revoked → lead(epoch+1) | closed.

The coordination store's election tells the monitor when leadership starts
(``establish_leadership(epoch)``) and ends (``revoke_leadership()``), on the store's
callback thread; the scheduler tells it that a pass was fenced out (``fenced(epoch)``),
on the scheduler's own thread. Each of these only queues the transition and returns.
The monitor's own thread carries them out in order: it starts the scheduler, and stops
it (which waits for the scheduler's thread to end). So no caller ever waits on a
transition: a revoke that waits for a scheduler which is itself waiting to revoke (the
deadlock that left a cluster without scheduling after a ZooKeeper hiccup) cannot happen,
and the store keeps delivering every other callback meanwhile.

The same thread watches each term. While this peer leads epoch E it publishes the
scheduler's newest completed pass (every peer's health check reads it), and when no
pass of E has completed for ``stall_timeout`` seconds, it logs why and resigns: the
store hands the lock to the next contender at once, and this peer contends again.
A double start is impossible by construction (one term at a time, on one thread); a
revoke with no term, or a fenced epoch that is not the current term's, is ignored.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from datetime import UTC, datetime

from distcrond.clock import Clock
from distcrond.coordination.base import CoordinationStore, SchedulerPass
from distcrond.scheduling.scheduler import Scheduler

log = logging.getLogger("distcrond.leadership")

# The newest pass is published at most this often (a pass completes at least every second).
PUBLISH_EVERY = 1.0  # seconds


@dataclass(frozen=True)
class _Transition:
    kind: str  # "establish" | "revoke" | "close"
    epoch: int | None = None  # establish: the new epoch; revoke: only if it is this term's


class LeadershipMonitor:
    """Drives the scheduler from the store's election; see the module's docstring."""

    def __init__(
        self,
        scheduler: Scheduler,
        coordination: CoordinationStore,
        peer_id: str,
        clock: Clock | None = None,
        stall_timeout: float = 5.0,
    ) -> None:
        self._scheduler = scheduler
        self._coordination = coordination
        self._peer_id = peer_id
        self._clock = clock or Clock()
        self._stall_timeout = stall_timeout
        # How often the thread looks at the term when nothing happens.
        self._check_every = min(0.25, stall_timeout / 4)
        self._transitions: queue.SimpleQueue[_Transition] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._epoch: int | None = None  # the current term's (read by any thread)
        self._term_started = 0.0  # monotonic
        self._scheduling = False  # the term's scheduler has started
        self._published: float | None = None  # the pass published last (monotonic)
        self._published_at = 0.0

    @property
    def epoch(self) -> int | None:
        """The epoch this peer schedules as, None when it does not lead."""
        return self._epoch

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="leadership", daemon=True)
        self._thread.start()

    # -- transitions asked for (any thread; never block) --------------------------
    def establish_leadership(self, epoch: int) -> None:
        self._transitions.put(_Transition("establish", epoch))

    def revoke_leadership(self) -> None:
        self._transitions.put(_Transition("revoke"))

    def fenced(self, epoch: int) -> None:
        """The scheduler of ``epoch`` was fenced out: that term ends (not a later one)."""
        self._transitions.put(_Transition("revoke", epoch))

    def close(self, timeout: float = 30.0) -> None:
        """End the term (the scheduler stops) and the monitor's thread; later calls to the
        transitions are ignored. For the daemon's shutdown, on the main thread."""
        self._transitions.put(_Transition("close"))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # -- the monitor's thread ---------------------------------------------------------
    def _main(self) -> None:
        while True:
            try:
                transition: _Transition | None = self._transitions.get(timeout=self._check_every)
            except queue.Empty:
                transition = None
            try:
                if transition is not None and transition.kind == "close":
                    self._end_term()
                    return
                if transition is not None:
                    self._apply(transition)
                self._watch_term()
            except Exception:
                log.exception("leadership transition failed")

    def _apply(self, transition: _Transition) -> None:
        if transition.kind == "revoke":
            if self._epoch is not None and transition.epoch in (None, self._epoch):
                self._end_term()
            return
        assert transition.epoch is not None
        if self._epoch is not None:
            log.warning("leading epoch %d already; epoch %d ends it", self._epoch, transition.epoch)
            self._end_term()
        self._epoch = transition.epoch
        self._term_started = self._clock.monotonic()
        self._scheduling = False
        self._published, self._published_at = None, 0.0
        self._start_scheduler(first=True)

    def _start_scheduler(self, first: bool) -> None:
        """Start the term's scheduler. While the previous term's thread has not ended, the
        term waits (tried again at every check), and the stall watchdog applies to it."""
        assert self._epoch is not None
        try:
            self._scheduler.start(self._epoch)
        except RuntimeError as exc:
            if first:
                log.error("cannot schedule epoch %d yet: %s", self._epoch, exc)
            return
        self._scheduling = True
        log.info("this peer is now leader (epoch %d)", self._epoch)

    def _end_term(self) -> None:
        epoch, self._epoch = self._epoch, None
        if epoch is None:
            return
        log.info("leadership of epoch %d ends", epoch)
        scheduling, self._scheduling = self._scheduling, False
        if scheduling and not self._scheduler.stop(timeout=self._stall_timeout):
            log.error(
                "the scheduler of epoch %d did not stop within %.1f s; this peer leads no more "
                "until it has",
                epoch,
                self._stall_timeout,
            )

    def _watch_term(self) -> None:
        """Publish the term's newest pass; resign when none completed for the stall timeout."""
        epoch = self._epoch
        if epoch is None:
            return
        if not self._scheduling:
            self._start_scheduler(first=False)
        term, last = self._scheduler.last_pass
        now = self._clock.monotonic()
        if term != epoch:
            last = None
        since = now - (last if last is not None else self._term_started)
        if since > self._stall_timeout:
            what = "since it began" if last is None else "since its last one"
            log.error(
                "leader stalled: no scheduler pass of epoch %d completed for %.1f s (%s; "
                "--leader-stall-timeout %.1f s); giving leadership up and contending again",
                epoch,
                since,
                what,
                self._stall_timeout,
            )
            self._coordination.resign(epoch)
            self._end_term()
            return
        if (
            last is not None
            and last != self._published
            and now - self._published_at >= min(PUBLISH_EVERY, self._stall_timeout / 4)
        ):
            at = self._clock.now().timestamp() - (now - last)
            self._coordination.publish_scheduler_pass(
                SchedulerPass(self._peer_id, epoch, _utc(at), self._stall_timeout, now - last)
            )
            self._published, self._published_at = last, now


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)
