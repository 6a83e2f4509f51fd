"""Attempt: a started attempt's outcome, and the callbacks called when it ends."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime

import pytest

from distcrond.execution.base import Attempt, RunOutcome

pytestmark = pytest.mark.timeout(30)

NOW = datetime(2026, 1, 1, tzinfo=UTC)
OUTCOME = RunOutcome(ok=True, exit_code=0, started_at=NOW, ended_at=NOW)


def test_a_callback_is_called_by_the_thread_that_ends_the_attempt() -> None:
    attempt = Attempt()
    seen: list[tuple[RunOutcome, str]] = []
    attempt.when_ended(lambda outcome: seen.append((outcome, threading.current_thread().name)))
    assert seen == []
    ender = threading.Thread(target=attempt.end, args=(OUTCOME,), name="ender")
    ender.start()
    ender.join(5)
    assert seen == [(OUTCOME, "ender")]
    assert attempt.wait() is OUTCOME


def test_a_callback_given_after_the_end_is_called_at_once() -> None:
    attempt = Attempt.ended(OUTCOME)
    seen: list[RunOutcome] = []
    attempt.when_ended(seen.append)
    assert seen == [OUTCOME]


def test_a_failing_callback_is_logged_and_the_others_are_still_called(
    caplog: pytest.LogCaptureFixture,
) -> None:
    attempt = Attempt()
    seen: list[RunOutcome] = []

    def broken(_outcome: RunOutcome) -> None:
        raise RuntimeError("broken callback")

    attempt.when_ended(broken)
    attempt.when_ended(seen.append)
    with caplog.at_level(logging.ERROR):
        attempt.end(OUTCOME)
    assert seen == [OUTCOME]
    assert attempt.done()
    assert "broken callback" in caplog.text
