"""What the embedded SQLite stores add to the contract: one file shared by the daemon
and the API workers, immediate local notifications, the schema version and the
state directory lock."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from distcrond.coordination.base import FencedOut, TriggerRequest
from distcrond.coordination.sqlite import SQLiteCoordinationStore
from distcrond.reporting.sqlite import SQLiteReportStore
from distcrond.runs import RunRecord, RunReport, RunState, run_id_for
from distcrond.sqlitedb import SchemaTooNew
from distcrond.statedir import StateDirLocked, acquire_state_lock

T0 = datetime(2026, 11, 27, 3, 10, tzinfo=UTC)


def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        time.sleep(0.005)  # polling a condition with a deadline


class Listener:
    def __init__(self) -> None:
        self.epochs: list[int] = []
        self.revoked = threading.Event()

    def establish_leadership(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def revoke_leadership(self) -> None:
        self.revoked.set()


def trigger(job_id: str, minute: int = 0) -> TriggerRequest:
    slot = T0 + timedelta(minutes=minute)
    return TriggerRequest(
        run_id=run_id_for(job_id, slot), job_id=job_id, slot=slot, requested_at=slot
    )


def assigned(job_id: str, minute: int = 0, peer_id: str = "p1") -> RunRecord:
    slot = T0 + timedelta(minutes=minute)
    return RunRecord(
        run_id=run_id_for(job_id, slot),
        job_id=job_id,
        slot=slot,
        node_id="n1",
        peer_id=peer_id,
        state=RunState.ASSIGNED,
    )


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "coordination.sqlite3"


@pytest.fixture
def daemon(db: Path) -> Iterator[SQLiteCoordinationStore]:
    store = SQLiteCoordinationStore(db, poll_interval=0.05)
    yield store
    store.close()


@pytest.fixture
def api_worker(db: Path, daemon: SQLiteCoordinationStore) -> Iterator[SQLiteCoordinationStore]:
    store = SQLiteCoordinationStore(db)
    yield store
    store.close()


def test_a_trigger_queued_by_an_api_worker_reaches_the_daemon_within_a_second(
    daemon: SQLiteCoordinationStore, api_worker: SQLiteCoordinationStore
) -> None:
    called = threading.Event()
    daemon.watch_triggers(called.set)

    api_worker.request_trigger(trigger("backup"))

    assert called.wait(1.0)
    assert daemon.pending_triggers() == [trigger("backup")]


def test_a_trigger_queued_by_another_process_reaches_the_daemon(
    db: Path, daemon: SQLiteCoordinationStore
) -> None:
    called = threading.Event()
    daemon.watch_triggers(called.set)
    script = f"""
from datetime import datetime
from distcrond.coordination.base import TriggerRequest
from distcrond.coordination.sqlite import SQLiteCoordinationStore
slot = datetime.fromisoformat("{T0.isoformat()}")
store = SQLiteCoordinationStore({str(db)!r})
store.request_trigger(TriggerRequest("backup@x", "backup", slot, slot, "api"))
store.close()
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=30)

    assert called.wait(1.0)
    assert [t.run_id for t in daemon.pending_triggers()] == ["backup@x"]


def test_runs_assigned_through_another_instance_reach_its_watcher(
    daemon: SQLiteCoordinationStore, api_worker: SQLiteCoordinationStore
) -> None:
    listener = Listener()
    daemon.start_election("p1", listener)
    eventually(lambda: bool(listener.epochs))
    seen: list[str] = []
    api_worker.watch_runs("p1", lambda record: seen.append(record.run_id))

    daemon.record_runs(listener.epochs[-1], [assigned("backup")])

    eventually(lambda: seen == [assigned("backup").run_id], timeout=1.0)


def test_local_writes_notify_without_waiting_for_a_poll(db: Path) -> None:
    store = SQLiteCoordinationStore(db, poll_interval=60)
    try:
        listener = Listener()
        store.start_election("p1", listener)
        eventually(lambda: bool(listener.epochs))
        seen = threading.Event()
        store.watch_runs("p1", lambda record: seen.set())

        started = time.monotonic()
        store.record_runs(listener.epochs[-1], [assigned("backup")])
        assert seen.wait(1.0)
        # The poll would take 60 s; the hand-off itself is well under a millisecond
        # (a generous bound, for loaded CI machines).
        assert time.monotonic() - started < 0.5
    finally:
        store.close()


def test_a_leader_deposed_by_another_instance_is_told_and_fenced(
    daemon: SQLiteCoordinationStore, api_worker: SQLiteCoordinationStore
) -> None:
    old, new = Listener(), Listener()
    daemon.start_election("p1", old)
    eventually(lambda: bool(old.epochs))

    api_worker.start_election("p2", new)
    eventually(lambda: bool(new.epochs))

    assert old.revoked.wait(1.0)
    with pytest.raises(FencedOut):
        daemon.record_runs(old.epochs[-1], [assigned("backup")])
    leader = daemon.leader()
    assert leader is not None and (leader.peer_id, leader.epoch) == ("p2", new.epochs[-1])

    api_worker.stop_election()  # the row is free again: the standing daemon takes it back
    eventually(lambda: len(old.epochs) == 2)
    assert old.epochs[-1] > new.epochs[-1]


def test_a_second_election_on_one_store_is_refused(daemon: SQLiteCoordinationStore) -> None:
    daemon.start_election("p1", Listener())
    with pytest.raises(RuntimeError):
        daemon.start_election("p1", Listener())


def test_close_is_idempotent_and_abdicates(db: Path) -> None:
    store = SQLiteCoordinationStore(db)
    listener = Listener()
    store.start_election("p1", listener)
    eventually(lambda: bool(listener.epochs))

    store.close()
    store.close()

    assert listener.revoked.is_set()
    other = SQLiteCoordinationStore(db)
    try:
        assert other.leader() is None
    finally:
        other.close()


def test_the_file_uses_wal_and_records_its_schema_version(db: Path) -> None:
    SQLiteCoordinationStore(db).close()
    SQLiteCoordinationStore(db).close()  # opening again is harmless

    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        conn.execute("PRAGMA user_version = 99")
        conn.commit()
    finally:
        conn.close()
    with pytest.raises(SchemaTooNew):
        SQLiteCoordinationStore(db)


def test_the_report_store_shares_its_file_between_instances(tmp_path: Path) -> None:
    writer = SQLiteReportStore(tmp_path / "reports.sqlite3")
    reader = SQLiteReportStore(tmp_path / "reports.sqlite3")
    try:
        report = RunReport(run_id="backup@x", job_id="backup", slot=T0, state=RunState.FAILED)
        writer.write([report])
        assert reader.get("backup@x") == report
        assert reader.last_run("backup") == report
        assert reader.last_run("other") is None
    finally:
        writer.close()
        reader.close()


def test_output_that_is_not_valid_unicode_round_trips(tmp_path: Path) -> None:
    store = SQLiteReportStore(tmp_path / "reports.sqlite3")
    try:
        raw = b"caf\xe9 \xff\n".decode("utf-8", "surrogateescape")
        report = RunReport(
            run_id="backup@x", job_id="backup", slot=T0, state=RunState.FAILED, stdout=raw
        )
        store.write([report])
        assert store.get("backup@x") == report
    finally:
        store.close()


def test_the_state_lock_refuses_a_second_holder(tmp_path: Path) -> None:
    with acquire_state_lock(tmp_path):
        with pytest.raises(StateDirLocked) as refused:
            acquire_state_lock(tmp_path)
        assert refused.value.path == tmp_path / "distcrond.lock"
        assert str(tmp_path) in str(refused.value)

    acquire_state_lock(tmp_path).release()  # free again once released


def test_the_state_lock_names_the_holding_process(tmp_path: Path) -> None:
    script = f"""
import sys
from distcrond.statedir import acquire_state_lock
lock = acquire_state_lock({str(tmp_path)!r})
print("locked", flush=True)
sys.stdin.read()
"""
    holder = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StateDirLocked) as refused:
            acquire_state_lock(tmp_path)
        assert refused.value.pid == holder.pid
        assert str(holder.pid) in str(refused.value)
    finally:
        holder.communicate("", timeout=30)
    acquire_state_lock(tmp_path).release()  # the lock died with its process
