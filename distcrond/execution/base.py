"""The runner interface: run one attempt of a command on one node.

Backends: ``local.py`` (a subprocess on the executing peer's host) and
``ssh.py`` (paramiko, on a remote node). A runner never raises for a command's failure: a
missing binary, a bad working directory or a timeout are outcomes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from distcrond.config.models import NodeSpec

log = logging.getLogger("distcrond.runner")


@dataclass(frozen=True)
class RunRequest:
    run_id: str
    job_id: str
    node_id: str
    peer_id: str
    slot: datetime
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)  # the job's env plus DISTCRON_*
    working_dir: str | None = None
    timeout: timedelta | None = None
    max_output_bytes: int = 1024 * 1024
    # Set to stop the attempt early (shutdown, concurrency: replace): like a timeout.
    cancel: threading.Event = field(default_factory=threading.Event, compare=False)
    # The node's file, for runners that need its connection options (SSH).
    node: NodeSpec | None = field(default=None, compare=False)


@dataclass(frozen=True)
class RunOutcome:
    ok: bool
    exit_code: int | None  # None when the command never started or was killed by a signal
    started_at: datetime
    ended_at: datetime
    stdout: str = ""
    stderr: str = ""
    output_truncated: bool = False
    reason: str = ""  # why it failed, for people: "timed out after 30s", "no such file: /bin/x"
    timed_out: bool = False
    cancelled: bool = False
    # True when the failure happened before the command could start (connect, spawn):
    # such a run may be re-placed on another node.
    not_started: bool = False


class Attempt:
    """A started attempt: its outcome once it has ended. Thread-safe."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._outcome: RunOutcome | None = None
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[RunOutcome], None]] = []

    @classmethod
    def ended(cls, outcome: RunOutcome) -> Attempt:
        attempt = cls()
        attempt.end(outcome)
        return attempt

    def end(self, outcome: RunOutcome) -> None:
        """Record the outcome (called once, by whoever ends the attempt), then call the
        callbacks given to :meth:`when_ended`, in this thread."""
        with self._lock:
            self._outcome = outcome
            callbacks, self._callbacks = self._callbacks, []
            self._done.set()
        for callback in callbacks:
            _call(callback, outcome)

    def when_ended(self, callback: Callable[[RunOutcome], None]) -> None:
        """Call ``callback(outcome)`` once the attempt has ended: in the thread that ends
        it, or at once in this one if it has ended already. A callback that raises is
        logged; it does not disturb whoever ended the attempt."""
        with self._lock:
            if self._outcome is None:
                self._callbacks.append(callback)
                return
            outcome = self._outcome
        _call(callback, outcome)

    def done(self, timeout: float = 0.0) -> bool:
        """Whether the attempt has ended, waiting at most ``timeout`` seconds for it."""
        return self._done.wait(timeout)

    def wait(self) -> RunOutcome:
        """Block until the attempt has ended; its outcome."""
        self._done.wait()
        assert self._outcome is not None
        return self._outcome


def _call(callback: Callable[[RunOutcome], None], outcome: RunOutcome) -> None:
    try:
        callback(outcome)
    except Exception:
        log.exception("a callback of an ended attempt failed")


class Runner(ABC):
    connection_type: str = "abstract"

    # True when start() returns as soon as the command is spawned, without waiting for it
    # (the executor then starts such runs from one thread, at their instants).
    starts_without_blocking: bool = False

    @abstractmethod
    def run(self, request: RunRequest) -> RunOutcome:
        """Run one attempt to its end (blocking) and return what happened."""

    def starting(self) -> AbstractContextManager[None]:
        """A context in which the caller starts several runs one after the other: the
        runner may put off its other work (reading the output of runs going on) until
        the context ends, so that the starts go first. This default puts off nothing."""
        return contextlib.nullcontext()

    def start(self, request: RunRequest) -> Attempt:
        """Start one attempt. This default runs it to its end first (see
        ``starts_without_blocking``)."""
        return Attempt.ended(self.run(request))

    def close(self) -> None:  # noqa: B027 - optional hook, most runners hold nothing
        """Release pooled resources (connections)."""
