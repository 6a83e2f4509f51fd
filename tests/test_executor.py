"""The executor over the real SQLite stores and the real local runner."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest

from distcrond.clock import Clock
from distcrond.config.loader import LoadedConfig
from distcrond.config.models import JobSpec, NodeSpec
from distcrond.coordination.base import ClaimInterrupted, StoreUnavailable
from distcrond.coordination.sqlite import SQLiteCoordinationStore
from distcrond.execution import executor as executor_module
from distcrond.execution.base import Attempt, RunRequest
from distcrond.execution.executor import SETTLE_DEFER, Executor, _Flight
from distcrond.execution.local import LocalRunner
from distcrond.reporting.sqlite import SQLiteReportStore
from distcrond.runs import RunRecord, RunReport, RunState, Trigger, run_id_for

pytestmark = pytest.mark.timeout(30)

T = TypeVar("T")


class Listener:
    def __init__(self) -> None:
        self.epoch: int | None = None
        self.ready = threading.Event()

    def establish_leadership(self, epoch: int) -> None:
        self.epoch = epoch
        self.ready.set()

    def revoke_leadership(self) -> None:
        pass


class Harness:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.clock = Clock()
        self.coordination = SQLiteCoordinationStore(tmp / "c.sqlite3")
        self.reports = SQLiteReportStore(tmp / "r.sqlite3")
        self.runner = LocalRunner(kill_grace=0.5)
        node = NodeSpec.model_validate({"id": "n1", "connection_type": "local"})
        self.config = LoadedConfig.build({}, {"n1": node})
        listener = Listener()
        self.coordination.start_election("p1", listener)
        assert listener.ready.wait(5)
        assert listener.epoch is not None
        self.epoch = listener.epoch
        self.executor = Executor(
            self.coordination,
            self.reports,
            {"local": self.runner},
            lambda: self.config,
            "p1",
            self.clock,
        )

    def use(self, coordination: SQLiteCoordinationStore) -> None:
        """Run the executor over another coordination store (a subclass of the real one)."""
        listener = Listener()
        coordination.start_election("p1", listener)
        assert listener.ready.wait(5) and listener.epoch is not None
        self.coordination.close()
        self.coordination, self.epoch = coordination, listener.epoch
        self.executor = Executor(
            coordination,
            self.reports,
            {"local": self.runner},
            lambda: self.config,
            "p1",
            self.clock,
        )

    def job(self, job_id: str, **fields: Any) -> JobSpec:
        spec: dict[str, Any] = {
            "id": job_id,
            "schedule": {"interval": "1h"},
            "command": ["/bin/true"],
        }
        spec.update(fields)
        job = JobSpec.model_validate(spec)
        self.config = LoadedConfig.build({**self.config.jobs, job_id: job}, self.config.nodes)
        return job

    def assign(self, job_id: str, slot: datetime | None = None, **fields: Any) -> RunRecord:
        slot = slot or datetime.now(UTC)
        record = RunRecord(
            run_id=run_id_for(job_id, slot),
            job_id=job_id,
            slot=slot,
            node_id="n1",
            peer_id="p1",
            state=RunState.ASSIGNED,
            epoch=self.epoch,
            **fields,
        )
        self.coordination.record_runs(self.epoch, [record])
        return record

    def poll(self, get: Callable[[], T | None], timeout: float, what: str) -> T:
        deadline = self.clock.monotonic() + timeout
        while self.clock.monotonic() < deadline:
            found = get()
            if found is not None:
                return found
            threading.Event().wait(0.02)
        raise AssertionError(what)

    def wait_report(self, run_id: str, timeout: float = 10) -> RunReport:
        return self.poll(lambda: self.reports.get(run_id), timeout, f"no report for {run_id}")

    def wait_state(self, run_id: str, state: RunState, timeout: float = 10) -> RunRecord:
        """The run's record once it is in ``state``: the report is written before it."""

        def in_state() -> RunRecord | None:
            stored = self.coordination.get_run(run_id)
            return stored if stored is not None and stored.state is state else None

        return self.poll(in_state, timeout, f"run {run_id} never got to {state}")

    def close(self) -> None:
        self.executor.stop(grace=0)
        self.runner.close()
        self.coordination.close()
        self.reports.close()


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    harness.close()


def test_assigned_run_is_executed_reported_and_finished(h: Harness, tmp_path: Path) -> None:
    out = tmp_path / "env"
    h.job(
        "hello",
        shell=True,
        command=f"env | grep ^DISTCRON_ | sort > {out}; echo hi",
        env={"GREETING": "x"},
    )
    h.executor.start()
    record = h.assign("hello")
    report = h.wait_report(record.run_id)
    assert report.state is RunState.SUCCEEDED and report.stdout == "hi\n"
    assert (report.node_id, report.peer_id, report.attempts) == ("n1", "p1", 1)
    env = dict(line.split("=", 1) for line in out.read_text().splitlines())
    assert env["DISTCRON_RUN_ID"] == record.run_id
    assert (
        env["DISTCRON_JOB"] == "hello"
        and env["DISTCRON_NODE"] == "n1"
        and env["DISTCRON_PEER"] == "p1"
    )
    assert env["DISTCRON_SLOT"].endswith("Z") and "." in env["DISTCRON_SLOT"]
    h.wait_state(record.run_id, RunState.SUCCEEDED)


def test_runs_assigned_before_start_are_picked_up(h: Harness) -> None:
    h.job("early")
    record = h.assign("early")
    h.executor.start()
    assert h.wait_report(record.run_id).state is RunState.SUCCEEDED


def test_a_run_claimed_elsewhere_is_never_started(h: Harness, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    h.job("once", command=["/usr/bin/touch", str(marker)])
    record = h.assign("once")
    assert h.coordination.claim_run(record.run_id, "p1", datetime.now(UTC)) is not None
    h.executor.start()
    h.job("probe")
    probe = h.assign("probe")
    h.wait_report(probe.run_id)  # the executor has dealt with what it was told about
    assert not marker.exists()


def test_failed_attempts_are_retried_with_backoff(h: Harness, tmp_path: Path) -> None:
    count = tmp_path / "count"
    h.job(
        "flaky",
        shell=True,
        retries={"count": 2, "backoff": "10ms"},
        command=f"echo x >> {count}; test $(wc -l < {count}) -ge 3",
    )
    h.executor.start()
    report = h.wait_report(h.assign("flaky").run_id)
    assert report.state is RunState.SUCCEEDED and report.attempts == 3


def test_retries_exhausted_leave_the_run_failed(h: Harness) -> None:
    h.job("bad", retries={"count": 1, "backoff": "10ms"}, command=["/bin/false"])
    h.executor.start()
    report = h.wait_report(h.assign("bad").run_id)
    assert report.state is RunState.FAILED and report.attempts == 2 and report.exit_code == 1


def test_missing_command_is_a_failed_run_with_a_clear_reason(h: Harness) -> None:
    h.job("typo", command=["/no/such/binary"])
    h.executor.start()
    report = h.wait_report(h.assign("typo").run_id)
    assert report.state is RunState.FAILED and "/no/such/binary" in report.reason


def running_long_job(h: Harness, tmp_path: Path, **fields: Any) -> RunRecord:
    """A run of a 60 s command, once the command has started."""
    started = tmp_path / "started"
    h.job("long", shell=True, command=f"touch {started}; sleep 60")
    h.executor.start()
    record = h.assign("long", **fields)
    h.poll(lambda: started.exists() or None, 10, "the command to start")
    return record


def test_cancel_request_stops_a_running_run(h: Harness, tmp_path: Path) -> None:
    record = running_long_job(h, tmp_path)
    assert h.coordination.request_cancel(record.run_id)
    report = h.wait_report(record.run_id)
    assert report.state is RunState.FAILED and "replaced" in report.reason


def test_a_cancel_by_a_token_ends_the_run_failed_naming_who_asked(
    h: Harness, tmp_path: Path
) -> None:
    record = running_long_job(h, tmp_path, trigger=Trigger.MANUAL, triggered_by="ops")
    assert h.coordination.request_cancel(record.run_id, "oncall")
    report = h.wait_report(record.run_id)
    assert report.state is RunState.FAILED and report.reason == "cancelled by oncall"
    assert (report.triggered_by, report.cancelled_by) == ("ops", "oncall")
    ended = h.wait_state(record.run_id, RunState.FAILED)
    assert ended.reason == "cancelled by oncall"


def test_a_run_cancelled_before_it_reached_its_peer_never_starts(
    h: Harness, tmp_path: Path
) -> None:
    ran = tmp_path / "ran"
    h.job("later", shell=True, command=f"touch {ran}")
    record = h.assign("later", slot=datetime.now(UTC) + timedelta(seconds=30))
    assert h.coordination.request_cancel(record.run_id, "oncall")  # before the peer starts
    h.executor.start()
    report = h.wait_report(record.run_id)
    assert report.state is RunState.FAILED and report.reason == "cancelled by oncall"
    assert report.cancelled_by == "oncall" and report.started_at is None
    assert not ran.exists()


def test_stale_scheduled_run_beyond_the_misfire_grace_is_missed(h: Harness) -> None:
    h.job("old", misfire={"policy": "run_all", "grace": "1m"})
    h.executor.start()
    record = h.assign("old", slot=datetime.now(UTC) - timedelta(hours=2))
    assert h.wait_report(record.run_id).state is RunState.MISSED


def test_run_of_a_removed_job_fails_with_the_reason(h: Harness) -> None:
    h.executor.start()
    report = h.wait_report(h.assign("vanished").run_id)
    assert report.state is RunState.FAILED and "no longer defined" in report.reason


def test_run_interrupted_by_a_crash_ends_unknown_after_restart(h: Harness) -> None:
    h.job("crashy")
    record = h.assign("crashy")
    h.coordination.claim_run(record.run_id, "p1", datetime.now(UTC))  # then the peer "died"
    h.executor.start()
    report = h.wait_report(record.run_id)
    assert report.state is RunState.UNKNOWN
    h.wait_state(record.run_id, RunState.UNKNOWN)


def test_at_least_once_run_interrupted_by_a_crash_runs_again(h: Harness) -> None:
    h.job("idem", delivery="at_least_once")
    record = h.assign("idem", at_least_once=True)
    h.coordination.claim_run(record.run_id, "p1", datetime.now(UTC))
    h.executor.start()
    report = h.wait_report(record.run_id)
    assert report.state is RunState.SUCCEEDED


def test_stop_cancels_runs_still_going_after_the_grace(h: Harness, tmp_path: Path) -> None:
    started = tmp_path / "started"
    h.job("forever", shell=True, command=f"touch {started}; sleep 60")
    h.executor.start()
    record = h.assign("forever")
    for _ in range(500):
        if started.exists():
            break
        threading.Event().wait(0.02)
    h.executor.stop(grace=0.1)
    report = h.reports.get(record.run_id)
    assert (
        report is not None and report.state is RunState.FAILED and "shutting down" in report.reason
    )
    assert report.trigger is Trigger.SCHEDULE


def test_runs_this_peer_left_running_are_settled_at_start(h: Harness) -> None:
    h.job("orphan")
    h.job("idempotent", delivery="at_least_once")
    slot = datetime.now(UTC)
    lost = RunRecord(
        run_id=run_id_for("orphan", slot),
        job_id="orphan",
        slot=slot,
        node_id="n1",
        peer_id="p1",
        state=RunState.ASSIGNED,
        epoch=h.epoch,
    )
    again = lost.replace(
        run_id=run_id_for("idempotent", slot), job_id="idempotent", at_least_once=True
    )
    h.coordination.record_runs(h.epoch, [lost, again])
    h.coordination.claim_run(lost.run_id, "p1", slot)  # by this peer's previous process
    h.coordination.claim_run(again.run_id, "p1", slot)

    h.executor.start()

    interrupted = h.wait_report(lost.run_id)
    assert interrupted.state is RunState.UNKNOWN and "outcome unknown" in interrupted.reason
    rerun = h.wait_report(again.run_id)
    assert rerun.state is RunState.SUCCEEDED and rerun.peer_id == "p1"


class FlakyReports(SQLiteReportStore):
    """The real store, unavailable for its first ``failures`` writes (a locked or down store)."""

    def __init__(self, path: Path, failures: int) -> None:
        super().__init__(path)
        self.failures = failures

    def write(self, reports: Any) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise StoreUnavailable("reports: database is locked")
        super().write(reports)


def test_outcome_is_recorded_once_the_report_store_is_back(h: Harness, tmp_path: Path) -> None:
    flaky = FlakyReports(tmp_path / "flaky.sqlite3", failures=2)
    h.reports.close()
    h.reports = flaky
    h.executor = Executor(
        h.coordination, flaky, {"local": h.runner}, lambda: h.config, "p1", h.clock
    )
    h.job("hello")
    h.executor.start()
    record = h.assign("hello")
    assert h.wait_report(record.run_id).state is RunState.SUCCEEDED
    assert flaky.failures == 0
    h.wait_state(record.run_id, RunState.SUCCEEDED)


class SuspendedCoordination(SQLiteCoordinationStore):
    """The real store, refusing its first ``refusals`` claims (a suspended session)."""

    refusals = 0

    def claim_runs(
        self, run_ids: Sequence[str], peer_id: str, started_at: datetime
    ) -> dict[str, RunRecord]:
        if self.refusals > 0:  # (claim_run claims through claim_runs)
            self.refusals -= 1
            raise StoreUnavailable("ZooKeeper session is SUSPENDED: not claiming")
        return super().claim_runs(run_ids, peer_id, started_at)


def test_a_run_delivered_while_claims_are_refused_starts_once_they_are_accepted(
    h: Harness, tmp_path: Path
) -> None:
    suspended = SuspendedCoordination(tmp_path / "suspended.sqlite3")
    h.use(suspended)
    suspended.refusals = 3
    h.job("hello")
    h.executor.start()
    record = h.assign("hello")
    assert h.wait_report(record.run_id).state is RunState.SUCCEEDED
    assert suspended.refusals == 0
    h.executor.stop(grace=1)
    suspended.close()


class AwayCoordination(SQLiteCoordinationStore):
    """The real store behind a connection that can be away: claims are refused (as a
    suspended ZooKeeper session refuses them) until ``connected`` is set."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.connected = threading.Event()
        self.refused: list[float] = []
        self.claimed_at: float | None = None

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    def claim_runs(
        self, run_ids: Sequence[str], peer_id: str, started_at: datetime
    ) -> dict[str, RunRecord]:
        if not self.connected.is_set():
            self.refused.append(time.monotonic())
            raise StoreUnavailable("ZooKeeper session is SUSPENDED: not claiming")
        self.claimed_at = time.monotonic()
        return super().claim_runs(run_ids, peer_id, started_at)


@pytest.mark.timeout(30)
def test_a_claim_refused_while_the_store_is_away_is_made_as_it_comes_back(
    h: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not at the next step of the back-off: refused four times (0.1 + 0.2 + 0.4 s apart),
    the back-off alone would try again 0.8 s after the fourth refusal."""
    monkeypatch.setattr(executor_module, "CLAIM_RETRY_MAX", 60.0)
    away = AwayCoordination(tmp_path / "away.sqlite3")
    h.use(away)
    h.job("hello")
    h.executor.start()
    record = h.assign("hello")
    h.poll(lambda: len(away.refused) >= 4 or None, 10, "the claim was not refused four times")
    back = time.monotonic()
    away.connected.set()
    assert h.wait_report(record.run_id).state is RunState.SUCCEEDED
    assert away.claimed_at is not None
    assert away.claimed_at - back < 0.4, f"claimed {away.claimed_at - back:.2f} s after"
    h.executor.stop(grace=1)
    away.close()


def test_a_run_assigned_before_its_slot_is_claimed_and_started_at_its_instant(
    h: Harness, tmp_path: Path
) -> None:
    started = tmp_path / "started"
    h.job("early", shell=True, command=f"date +%s.%N > {started}")
    h.executor.start()
    slot = datetime.now(UTC) + timedelta(seconds=0.5)
    record = h.assign("early", slot=slot)

    waiting = h.coordination.get_run(record.run_id)
    if datetime.now(UTC) < slot:  # looked at before the slot: not claimed yet
        assert waiting is not None and waiting.state is RunState.ASSIGNED

    report = h.wait_report(record.run_id)
    assert report.state is RunState.SUCCEEDED
    assert report.started_at is not None and report.started_at >= slot
    assert float(started.read_text()) >= slot.timestamp()


class StartRecorder(LocalRunner):
    """The real local runner, noting which thread started each run."""

    def __init__(self) -> None:
        super().__init__(kill_grace=0.5)
        self.threads: list[str] = []

    def start(self, request: RunRequest) -> Attempt:
        self.threads.append(threading.current_thread().name)
        return super().start(request)


def test_runs_due_at_the_same_instant_are_all_started_by_the_one_starter_thread(
    h: Harness,
) -> None:
    recorder = StartRecorder()
    h.executor = Executor(
        h.coordination, h.reports, {"local": recorder}, lambda: h.config, "p1", h.clock
    )
    slot = datetime.now(UTC) + timedelta(seconds=0.3)
    ids = [h.assign(h.job(f"burst-{i}").id, slot=slot).run_id for i in range(20)]
    h.executor.start()
    reports = [h.wait_report(run_id) for run_id in ids]
    assert all(r.state is RunState.SUCCEEDED for r in reports)
    assert recorder.threads == ["run-starter"] * 20
    recorder.close()


def test_a_run_is_claimed_ahead_of_its_slot_and_started_at_it(h: Harness, tmp_path: Path) -> None:
    started = tmp_path / "started"
    h.executor = Executor(
        h.coordination,
        h.reports,
        {"local": h.runner},
        lambda: h.config,
        "p1",
        h.clock,
        claim_ahead=0.6,
    )
    h.job("ahead", shell=True, command=f"date +%s.%N > {started}")
    h.executor.start()
    slot = datetime.now(UTC) + timedelta(seconds=0.9)
    record = h.assign("ahead", slot=slot)
    seen_running_before_slot = False
    while datetime.now(UTC) < slot - timedelta(seconds=0.05):
        stored = h.coordination.get_run(record.run_id)
        if stored is not None and stored.state is RunState.RUNNING:
            seen_running_before_slot = True
            assert stored.started_at == slot  # the instant it is to start at
            assert not started.exists()
            break
        threading.Event().wait(0.01)
    assert seen_running_before_slot
    report = h.wait_report(record.run_id)
    assert report.state is RunState.SUCCEEDED
    assert report.started_at is not None and report.started_at >= slot
    assert float(started.read_text()) >= slot.timestamp()


def test_settling_waits_while_the_starter_is_starting_runs(h: Harness) -> None:
    ex = h.executor
    ex._starting = True  # as the starter sets it around a batch of starts
    settled_may_go = threading.Event()
    waiter = threading.Thread(target=lambda: (ex._yield_to_starts(), settled_may_go.set()))
    waiter.start()
    assert not settled_may_go.wait(0.2)
    ex._starting = False
    assert settled_may_go.wait(5)
    waiter.join(5)


def test_settling_does_not_wait_on_a_start_that_is_already_overdue(h: Harness) -> None:
    """A late starter is busy: waiting for it would only keep ended runs 'running'
    (and a `forbid` job's next slot skipped)."""
    ex = h.executor
    record = h.assign(h.job("late").id)
    overdue = _Flight(record, datetime.now(UTC) - timedelta(seconds=1))
    with ex._lock:
        ex._ready.append((overdue.start_at, 0, overdue))
    began = time.monotonic()
    ex._yield_to_starts()
    assert time.monotonic() - began < SETTLE_DEFER / 2


def test_runs_that_end_within_the_gathering_time_are_settled_together(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(executor_module, "SETTLE_GATHER", 0.5)  # wide: no race with a slow CI
    batches: list[int] = []
    write = h.reports.write
    monkeypatch.setattr(
        h.reports, "write", lambda reports: (batches.append(len(reports)), write(reports))
    )
    job = h.job("gathered")
    records = [h.assign(job.id, slot=datetime.now(UTC) - timedelta(seconds=i)) for i in (1, 2)]
    reports = [
        RunReport(r.run_id, r.job_id, r.slot, RunState.SUCCEEDED, "n1", "p1", attempts=1)
        for r in records
    ]
    h.executor._settler.start()
    h.executor._settle(reports[0])
    time.sleep(0.05)  # the second run ends 50 ms after the first (not a synchronisation)
    h.executor._settle(reports[1])
    for r in records:
        h.wait_report(r.run_id)

    assert batches == [2]
    for r in records:
        h.wait_state(r.run_id, RunState.SUCCEEDED)


def pool_runs(h: Harness, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ids of the runs given to a thread of the pool, as they are given."""
    executed: list[str] = []
    execute = h.executor._execute
    monkeypatch.setattr(
        h.executor,
        "_execute",
        lambda flight, *a: (executed.append(flight.record.run_id), execute(flight, *a)),
    )
    return executed


def test_a_spawned_run_is_settled_without_a_thread_of_its_own(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The starter spawns a local run, and its end hands it to the settler: no thread of
    the pool waits for it (a thread per run costs a switch of the interpreter per end)."""
    executed = pool_runs(h, monkeypatch)
    record = h.assign(h.job("threadless").id)
    h.executor.start()
    assert h.wait_report(record.run_id).state is RunState.SUCCEEDED
    assert executed == []


def test_a_spawned_run_that_fails_is_retried_by_a_thread_of_the_pool(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    executed = pool_runs(h, monkeypatch)
    job = h.job("retried", command=["/bin/false"], retries={"count": 1, "backoff": "10ms"})
    record = h.assign(job.id)
    h.executor.start()
    report = h.wait_report(record.run_id)
    assert (report.state, report.attempts) == (RunState.FAILED, 2)
    assert executed == [record.run_id]


class InterruptedCoordination(SQLiteCoordinationStore):
    """The real store, losing its connection once after claiming the first run of a batch."""

    interruptions = 1

    def claim_runs(
        self, run_ids: Sequence[str], peer_id: str, started_at: datetime
    ) -> dict[str, RunRecord]:
        if self.interruptions > 0 and len(run_ids) > 1:
            self.interruptions -= 1
            first = super().claim_runs(run_ids[:1], peer_id, started_at)
            raise ClaimInterrupted(StoreUnavailable("connection lost"), first)
        return super().claim_runs(run_ids, peer_id, started_at)


def test_runs_claimed_before_a_claim_batch_was_interrupted_start_and_the_rest_are_retried(
    h: Harness, tmp_path: Path
) -> None:
    store = InterruptedCoordination(tmp_path / "interrupted.sqlite3")
    h.use(store)
    slot = datetime.now(UTC) + timedelta(seconds=0.3)
    ids = [h.assign(h.job(f"batch-{i}").id, slot=slot).run_id for i in range(3)]
    h.executor.start()
    reports = [h.wait_report(run_id) for run_id in ids]
    assert [r.state for r in reports] == [RunState.SUCCEEDED] * 3
    assert store.interruptions == 0
