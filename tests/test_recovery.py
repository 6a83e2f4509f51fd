"""Settling an abandoned run when the report store cannot be read (Elasticsearch down)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from distcrond.coordination.base import CoordinationStore, StoreUnavailable
from distcrond.coordination.sqlite import SQLiteCoordinationStore
from distcrond.recovery import settle_abandoned
from distcrond.reporting.sqlite import SQLiteReportStore
from distcrond.runs import RunRecord, RunReport, RunState, run_id_for
from tests.contract.test_coordination import Listener

pytestmark = pytest.mark.timeout(30)

SLOT = datetime(2026, 11, 27, 3, 10, tzinfo=UTC)


class UnreadableReports(SQLiteReportStore):
    """A report store whose reads fail, as Elasticsearch's do while it is down."""

    def get(self, run_id: str) -> RunReport | None:
        raise StoreUnavailable("connection refused")


@pytest.fixture
def coordination(tmp_path: Path) -> Iterator[CoordinationStore]:
    store = SQLiteCoordinationStore(tmp_path / "c.sqlite3")
    yield store
    store.close()


def running(coordination: CoordinationStore, *, at_least_once: bool = False) -> RunRecord:
    listener = Listener()
    coordination.start_election("leader", listener)
    run = RunRecord(
        run_id=run_id_for("backup", SLOT),
        job_id="backup",
        slot=SLOT,
        node_id="n1",
        peer_id="lost",
        state=RunState.ASSIGNED,
        created_at=SLOT,
        at_least_once=at_least_once,
    )
    coordination.record_runs(listener.epoch(), [run])
    claimed = coordination.claim_run(run.run_id, "lost", SLOT + timedelta(seconds=1))
    assert claimed is not None
    return claimed


def test_an_unreadable_report_store_does_not_keep_an_abandoned_run_active(
    coordination: CoordinationStore, tmp_path: Path
) -> None:
    reports = UnreadableReports(tmp_path / "r.sqlite3")
    record = running(coordination)

    settled = settle_abandoned(
        coordination, reports, record, SLOT + timedelta(seconds=5), requeue_to=None, why="lost"
    )

    assert settled is not None and settled.state is RunState.UNKNOWN
    stored = coordination.get_run(record.run_id)
    assert stored is not None and stored.state is RunState.UNKNOWN
    written = SQLiteReportStore.get(reports, record.run_id)
    assert written is not None and written.state is RunState.UNKNOWN
    reports.close()


def test_an_unreadable_report_store_still_requeues_an_at_least_once_run(
    coordination: CoordinationStore, tmp_path: Path
) -> None:
    reports = UnreadableReports(tmp_path / "r.sqlite3")
    record = running(coordination, at_least_once=True)

    requeued = settle_abandoned(
        coordination, reports, record, SLOT + timedelta(seconds=5), requeue_to="other", why="lost"
    )

    assert requeued is not None
    assert (requeued.state, requeued.peer_id) == (RunState.ASSIGNED, "other")
    reports.close()
