"""Leadership as a pair of transitions, driven by the coordination store's election.

``establish_leadership(epoch)`` starts the scheduler, ``revoke_leadership()``
stops it. A double start or a stop without a start is refused (logged and
ignored), so a store that repeats a notification cannot run two schedulers.
"""

from __future__ import annotations

import logging
import threading

from distcrond.scheduling.scheduler import Scheduler

log = logging.getLogger("distcrond.leadership")


class LeadershipMonitor:
    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler
        self._lock = threading.Lock()
        self._epoch: int | None = None

    @property
    def epoch(self) -> int | None:
        return self._epoch

    def establish_leadership(self, epoch: int) -> None:
        with self._lock:
            if self._epoch is not None:
                log.warning(
                    "already leader (epoch %d); ignoring a second start (%d)", self._epoch, epoch
                )
                return
            self._epoch = epoch
            log.info("this peer is now leader (epoch %d)", epoch)
            self._scheduler.start(epoch)

    def revoke_leadership(self) -> None:
        with self._lock:
            if self._epoch is None:
                return
            log.info("leadership of epoch %d ends", self._epoch)
            self._epoch = None
            self._scheduler.stop()
