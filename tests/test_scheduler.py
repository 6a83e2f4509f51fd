"""The scheduler's decisions, driven step by step on a fake clock over the real SQLite stores."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from distcrond.clock import FakeClock
from distcrond.config.loader import LoadedConfig
from distcrond.config.models import CronSchedule, JobSpec, NodeSpec
from distcrond.coordination.base import FencedOut, PeerInfo, StoreUnavailable, TriggerRequest
from distcrond.coordination.sqlite import SQLiteCoordinationStore
from distcrond.reporting.base import RunQuery
from distcrond.reporting.sqlite import SQLiteReportStore
from distcrond.runs import RunRecord, RunReport, RunState, Trigger, run_id_for
from distcrond.scheduling.scheduler import (
    HOLD_POLL,
    LOOKAHEAD,
    PASS_SPAN,
    STORE_WAIT_S,
    Scheduler,
)
from distcrond.scheduling.schedules import fuzzy_offset, next_slot

T0 = datetime(2026, 11, 27, 12, 0, 0, tzinfo=UTC)


class Epochs:
    """A leadership listener that remembers the epoch it was given."""

    def __init__(self) -> None:
        self.epochs: list[int] = []
        self.event = threading.Event()

    def establish_leadership(self, epoch: int) -> None:
        self.epochs.append(epoch)
        self.event.set()

    def revoke_leadership(self) -> None:
        pass


def make_job(job_id: str, **fields: Any) -> JobSpec:
    spec: dict[str, Any] = {"id": job_id, "schedule": {"interval": "1s"}, "command": ["/bin/true"]}
    spec.update(fields)
    return JobSpec.model_validate(spec)


def local_node(node_id: str, roles: list[str] | None = None) -> NodeSpec:
    return NodeSpec.model_validate(
        {"id": node_id, "roles": roles or [], "connection_type": "local"}
    )


class Harness:
    def __init__(self, tmp: Path) -> None:
        self.clock = FakeClock(T0)
        self.coordination = SQLiteCoordinationStore(tmp / "c.sqlite3", clock=self.clock)
        self.reports = SQLiteReportStore(tmp / "r.sqlite3")
        self.config = LoadedConfig.build({}, {"n1": local_node("n1")})
        self.coordination.register_peer(PeerInfo("p1", "http://x", T0, "test"))
        self.fenced = threading.Event()
        self.scheduler = self.new_scheduler()

    def new_scheduler(self) -> Scheduler:
        return Scheduler(
            self.coordination,
            self.reports,
            lambda: self.config,
            self.clock,
            ["local"],
            on_fenced=lambda _epoch: self.fenced.set(),
        )

    def set_jobs(self, *jobs: JobSpec, nodes: dict[str, NodeSpec] | None = None) -> None:
        self.config = LoadedConfig.build({j.id: j for j in jobs}, nodes or dict(self.config.nodes))
        self.scheduler.config_changed()

    def lead(self, scheduler: Scheduler | None = None, thread: bool = False) -> int:
        """Win an election and start the scheduler (its first step() settles the past;
        ``thread``: its own loop takes the steps)."""
        listener = Epochs()
        self.coordination.stop_election()
        self.coordination.start_election("p1", listener)
        assert listener.event.wait(5)
        (scheduler or self.scheduler).start(listener.epochs[-1], thread=thread)
        return listener.epochs[-1]

    def at(self, seconds: float) -> None:
        """Move to T0 + seconds and run one scheduler pass."""
        self.clock.set(T0 + timedelta(seconds=seconds))
        self.scheduler.step()

    def records(self, **filters: Any) -> list[RunRecord]:
        return self.coordination.runs(**filters)

    def close(self) -> None:
        self.coordination.close()
        self.reports.close()


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    harness.close()


def test_due_slot_is_recorded_once_and_assigned(h: Harness) -> None:
    h.set_jobs(make_job("tick"))
    h.lead()
    h.at(0.5)
    assert h.records() == []
    h.at(1.0)
    h.at(1.0)
    h.at(1.2)
    (run,) = h.records()
    assert run.run_id == run_id_for("tick", T0 + timedelta(seconds=1))
    assert (run.state, run.node_id, run.peer_id, run.trigger) == (
        RunState.ASSIGNED,
        "n1",
        "p1",
        Trigger.SCHEDULE,
    )
    assert h.coordination.cursors() == {"tick": T0 + timedelta(seconds=1)}


def test_late_pass_records_every_slot_it_overslept(h: Harness) -> None:
    h.set_jobs(make_job("tick", concurrency="allow"))
    h.lead()
    h.at(0)
    h.at(3.5)  # one pass, three due slots: recorded in order, none lost
    h.at(3.5)
    h.at(3.5)
    slots = [r.slot for r in h.records()]
    assert slots == [T0 + timedelta(seconds=s) for s in (1, 2, 3)]


def test_slots_that_fell_due_while_a_write_waited_go_out_in_the_same_pass(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write held by the store (a ZooKeeper server's loss holds it until the
    reconnection) does not also hold back, by a reconciliation, the slots due meanwhile."""
    h.set_jobs(make_job("tick"))
    h.lead()
    h.at(0)
    record_runs = h.coordination.record_runs

    def held(*args: Any, **kwargs: Any) -> list[RunRecord]:
        created = record_runs(*args, **kwargs)
        monkeypatch.setattr(h.coordination, "record_runs", record_runs)
        h.clock.set(T0 + timedelta(seconds=2.5))  # it came back 1.5 s later
        return created

    monkeypatch.setattr(h.coordination, "record_runs", held)
    h.at(1.0)
    assert [r.slot for r in h.records()] == [T0 + timedelta(seconds=s) for s in (1, 2)]


def test_no_pass_starts_while_the_store_is_away_and_the_first_one_after_takes_every_due_slot(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass begun while the store's connection is away would wait in the client, and
    the slots due meanwhile would need a second write after it: no pass starts then,
    and the one at the reconnection records them all in one write."""
    h.set_jobs(make_job("tick"), make_job("tock"))
    h.lead()
    h.at(0)
    record_runs = h.coordination.record_runs
    writes: list[list[str]] = []

    def counted(epoch: int, runs: Any, *args: Any, **kwargs: Any) -> list[RunRecord]:
        writes.append(sorted(r.run_id for r in runs))
        return record_runs(epoch, runs, *args, **kwargs)

    monkeypatch.setattr(h.coordination, "record_runs", counted)
    waits: list[float] = []
    monkeypatch.setattr(h.coordination, "wait_connected", lambda t: waits.append(t) or False)
    passes = h.scheduler.last_pass
    h.at(0.97)
    h.at(1.2)
    assert writes == [] and waits == [STORE_WAIT_S, STORE_WAIT_S]
    assert h.scheduler.last_pass == passes  # no pass ran: its age says so
    monkeypatch.setattr(h.coordination, "wait_connected", lambda t: True)
    h.at(1.6)
    assert writes == [
        sorted(run_id_for(job, T0 + timedelta(seconds=1)) for job in ("tick", "tock"))
    ]


def test_forbid_skips_a_slot_while_the_previous_run_is_active(h: Harness) -> None:
    h.set_jobs(make_job("tick"))
    h.lead()
    h.at(0)
    h.at(1)
    h.at(2)
    first, second = h.records()
    assert first.state is RunState.ASSIGNED
    assert second.state is RunState.SKIPPED and first.run_id in second.reason
    report = h.reports.get(second.run_id)
    assert report is not None and report.state is RunState.SKIPPED


def test_allow_records_overlapping_runs(h: Harness) -> None:
    h.set_jobs(make_job("tick", concurrency="allow"))
    h.lead()
    h.at(0)
    h.at(1)
    h.at(2)
    assert [r.state for r in h.records()] == [RunState.ASSIGNED, RunState.ASSIGNED]


def test_replace_asks_the_running_run_to_stop(h: Harness) -> None:
    h.set_jobs(make_job("tick", concurrency="replace"))
    h.lead()
    h.at(0)
    h.at(1)
    h.at(2)
    first, second = h.records()
    assert first.cancel_requested and second.state is RunState.ASSIGNED


def test_slot_with_no_eligible_node_is_recorded_failed_with_the_reason(h: Harness) -> None:
    h.set_jobs(make_job("tick", policy={"roles": ["gpu"]}))
    h.lead()
    h.at(0)
    h.at(1)
    (run,) = h.records()
    assert run.state is RunState.FAILED and "gpu" in run.reason
    report = h.reports.get(run.run_id)
    assert report is not None and "gpu" in report.reason


def test_hosts_all_records_one_run_per_node(h: Harness) -> None:
    h.set_jobs(
        make_job("tick", policy={"hosts": "all"}),
        nodes={"a": local_node("a"), "b": local_node("b")},
    )
    h.lead()
    h.at(0)
    h.at(1)
    base = run_id_for("tick", T0 + timedelta(seconds=1))
    assert sorted(r.run_id for r in h.records()) == [f"{base}~a", f"{base}~b"]


def test_disabled_and_removed_jobs_get_no_slots(h: Harness) -> None:
    h.set_jobs(make_job("off", enabled=False), make_job("gone"))
    h.lead()
    h.at(0)
    h.at(1)
    assert [r.job_id for r in h.records()] == ["gone"]
    h.set_jobs(make_job("off", enabled=False))
    h.at(2)
    h.at(3)
    assert [r.job_id for r in h.records()] == ["gone"]


def test_changed_schedule_takes_effect_at_once(h: Harness) -> None:
    h.set_jobs(make_job("tick", schedule={"interval": "1h"}))
    h.lead()
    h.at(0)
    h.set_jobs(make_job("tick", schedule={"interval": "1s"}))
    h.at(0.5)
    h.at(1)
    assert [r.slot for r in h.records()] == [T0 + timedelta(seconds=1)]


def test_manual_trigger_is_recorded_under_the_requested_run_id(h: Harness) -> None:
    h.set_jobs(make_job("tick", schedule={"interval": "1h"}))
    h.lead()
    h.at(0)
    slot = T0 + timedelta(seconds=0.25)
    h.coordination.request_trigger(
        TriggerRequest(run_id_for("tick", slot), "tick", slot, slot, "ops")
    )
    h.scheduler.triggers_queued()
    h.at(0.3)
    (run,) = h.records()
    assert run.run_id == run_id_for("tick", slot) and run.trigger is Trigger.MANUAL
    assert run.triggered_by == "ops"  # the token that asked, on the record and its report
    assert h.coordination.pending_triggers() == []


def test_manual_trigger_of_an_unknown_job_is_recorded_failed(h: Harness) -> None:
    h.lead()
    h.at(0)
    h.coordination.request_trigger(TriggerRequest(run_id_for("ghost", T0), "ghost", T0, T0, "ops"))
    h.scheduler.triggers_queued()
    h.at(0.1)
    (run,) = h.records()
    assert run.state is RunState.FAILED and "not defined" in run.reason
    assert run.triggered_by == "ops"


def test_deposed_leader_writes_nothing(h: Harness) -> None:
    h.set_jobs(make_job("tick"))
    h.lead()
    h.at(0)
    other = h.new_scheduler()
    h.lead(other)  # a newer epoch: the first scheduler is fenced out
    h.clock.set(T0 + timedelta(seconds=1))
    with pytest.raises(FencedOut):
        h.scheduler.step()
    assert h.records() == []


def restart_after_gap(h: Harness, job: JobSpec, gap_to: float) -> list[RunRecord]:
    """Run a job's slots 1-2 as leader, lose leadership, and take it back at T0+gap_to."""
    h.set_jobs(job)
    h.lead()
    h.at(0)
    h.at(1)
    h.at(2)
    for run in h.records():
        h.coordination.finish_run(run.run_id, RunState.SUCCEEDED, ended_at=h.clock.now())
    h.scheduler = h.new_scheduler()
    h.lead()
    h.at(gap_to)
    return [r for r in h.records() if r.slot > T0 + timedelta(seconds=2)]


def test_misfire_skip_records_every_missed_slot_as_missed(h: Harness) -> None:
    runs = restart_after_gap(h, make_job("tick", misfire="skip"), 6.5)
    assert [(r.slot, r.state) for r in runs] == [
        (T0 + timedelta(seconds=s), RunState.MISSED) for s in (3, 4, 5, 6)
    ]


def test_misfire_run_once_runs_the_newest_missed_slot(h: Harness) -> None:
    runs = restart_after_gap(h, make_job("tick", misfire="run_once"), 6.5)
    assert [r.state for r in runs] == [RunState.MISSED] * 3 + [RunState.ASSIGNED]
    assert runs[-1].slot == T0 + timedelta(seconds=6) and runs[-1].trigger is Trigger.MISFIRE


def test_misfire_run_all_runs_every_missed_slot(h: Harness) -> None:
    runs = restart_after_gap(h, make_job("tick", misfire="run_all"), 6.5)
    assert [r.state for r in runs] == [RunState.ASSIGNED] * 4
    assert [r.slot for r in runs] == [T0 + timedelta(seconds=s) for s in (3, 4, 5, 6)]


def test_misfire_grace_bounds_what_is_caught_up(h: Harness) -> None:
    runs = restart_after_gap(h, make_job("tick", misfire={"policy": "run_all", "grace": "2s"}), 6.5)
    states = {r.slot: r.state for r in runs}
    assert states[T0 + timedelta(seconds=3)] is RunState.MISSED
    assert states[T0 + timedelta(seconds=4)] is RunState.MISSED
    assert states[T0 + timedelta(seconds=5)] is RunState.ASSIGNED
    assert states[T0 + timedelta(seconds=6)] is RunState.ASSIGNED


def test_after_catch_up_the_schedule_goes_on_without_gap_or_double(h: Harness) -> None:
    restart_after_gap(h, make_job("tick", misfire="run_all", concurrency="allow"), 6.5)
    h.at(7)
    h.at(8)
    slots = [r.slot for r in h.records()]
    assert slots == [T0 + timedelta(seconds=s) for s in range(1, 9)]
    assert len({r.run_id for r in h.records()}) == 8


def test_missed_slots_are_reported(h: Harness) -> None:
    restart_after_gap(h, make_job("tick", misfire="skip"), 4.5)
    page = h.reports.list_runs(RunQuery(job_id="tick", states=(RunState.MISSED,)))
    assert len(page.runs) == 2
    assert all("no peer was leader" in r.reason for r in page.runs)


def test_threaded_scheduler_records_slots_and_stops(h: Harness) -> None:
    """The real loop on a thread: it wakes for a trigger, records it, and stops on request."""
    h.set_jobs(make_job("tick", schedule={"interval": "1h"}))
    h.lead(thread=True)
    h.coordination.request_trigger(TriggerRequest(run_id_for("tick", T0), "tick", T0, T0, "p1"))
    h.scheduler.triggers_queued()
    deadline = threading.Event()
    for _ in range(500):
        if h.records():
            break
        deadline.wait(0.01)
    h.scheduler.stop()
    assert [r.trigger for r in h.records()] == [Trigger.MANUAL]
    assert not h.scheduler.running


def test_a_schedule_that_never_fires_does_not_stop_other_jobs(h: Harness) -> None:
    # Validation refuses such a file; a schedule can still run out (defence in depth).
    never = CronSchedule.model_construct(cron="0 0 30 2 *", timezone="UTC")
    h.set_jobs(make_job("feb30").model_copy(update={"schedule": never}), make_job("tick"))
    h.lead()
    h.at(0)
    h.at(1)
    assert [r.job_id for r in h.records()] == ["tick"]


# -- runs of peers that are gone ---------------------------------------------------------


def pinned_node(node_id: str, peer: str) -> NodeSpec:
    return NodeSpec.model_validate({"id": node_id, "connection_type": "local", "peer": peer})


def orphan(h: Harness, epoch: int, job_id: str, peer: str, node: str = "n1", **f: Any) -> RunRecord:
    """A run recorded for ``peer`` (registered now; the test unregisters it to make it gone)."""
    h.coordination.register_peer(PeerInfo(peer, "http://y", T0, "test"))
    record = RunRecord(
        run_id=run_id_for(job_id, T0),
        job_id=job_id,
        slot=T0,
        node_id=node,
        peer_id=peer,
        state=RunState.ASSIGNED,
        epoch=epoch,
        **f,
    )
    h.coordination.record_runs(epoch, [record])
    return record


def test_a_run_assigned_to_a_peer_that_is_gone_moves_to_a_live_peer(h: Harness) -> None:
    h.set_jobs(make_job("tick", schedule={"interval": "1h"}))
    epoch = h.lead()
    record = orphan(h, epoch, "tick", "old")
    h.at(0.1)
    assert h.coordination.get_run(record.run_id) == record  # "old" is alive: left alone

    h.coordination.unregister_peer("old")
    h.at(1.2)
    moved = h.coordination.get_run(record.run_id)
    assert moved == record.replace(peer_id="p1")


def test_a_live_peer_that_leaves_a_due_run_unstarted_loses_it_and_gets_no_new_runs_a_while(
    h: Harness,
) -> None:
    """The chaos suite's follower pause: a stopped peer keeps its session (so its place among
    the live peers) for seconds, its runs waited, and the next slots of their jobs were
    skipped, until the whole cluster ran nearly nothing."""
    h.set_jobs(make_job("tick", schedule={"interval": "1h"}), make_job("beat", concurrency="allow"))
    epoch = h.lead()
    stuck = orphan(h, epoch, "tick", "stuck")

    def at(second: float) -> None:  # p1's executor claims its due runs at once
        h.at(second)
        for r in h.records(states={RunState.ASSIGNED}):
            if r.peer_id == "p1" and r.slot <= h.clock.now():
                h.coordination.claim_run(r.run_id, "p1", h.clock.now())

    at(0.5)
    assert h.coordination.get_run(stuck.run_id) == stuck  # not overdue yet: left alone
    at(1.6)  # a reconciliation: the run was due 1.6 s ago and "stuck" is live but idle
    moved = h.coordination.get_run(stuck.run_id)
    assert moved is not None and moved.peer_id == "p1" and moved.state is RunState.RUNNING
    assert h.coordination.claim_run(stuck.run_id, "stuck", T0) is None  # its late claim fails
    for second in (2.0, 3.0, 4.0, 5.0, 6.0):
        at(second)
    beats = h.records(job_id="beat")
    placed = {r.run_id: r.peer_id for r in beats if r.slot >= T0 + timedelta(seconds=2)}
    assert len(placed) >= 4 and set(placed.values()) == {"p1"}  # no new runs for "stuck"
    for second in (6.7, 7.0, 8.0, 9.0):  # the hold (5 s from 1.6) is over
        at(second)
    later = [r for r in h.records(job_id="beat") if r.slot > T0 + timedelta(seconds=6.7)]
    assert "stuck" in {r.peer_id for r in later}


def test_no_peer_is_suspected_for_the_time_the_leader_itself_was_cut_off(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ZooKeeper server's loss cuts every peer off at once: when the leader's connection
    comes back, every run due meanwhile is overdue, and no peer is to blame for it. The
    peers get a second from the reconnection, as from a run's slot."""
    h.set_jobs(make_job("tick", schedule={"interval": "1h"}))
    epoch = h.lead()
    waiting = orphan(h, epoch, "tick", "other")
    h.coordination.register_peer(PeerInfo("p1", "http://x", T0, "test"))
    monkeypatch.setattr(h.coordination, "reconnected_at", lambda: T0 + timedelta(seconds=1.2))
    h.at(1.6)  # due 1.6 s ago, but the leader could not see for the first 1.2 s
    assert h.coordination.get_run(waiting.run_id) == waiting
    h.at(2.7)  # 1.5 s after the reconnection (the next reconciliation), unclaimed: moved
    moved = h.coordination.get_run(waiting.run_id)
    assert moved is not None and moved.peer_id == "p1"


def test_a_run_overdue_on_the_only_live_peer_stays_where_it_is(h: Harness) -> None:
    h.set_jobs(make_job("tick", schedule={"interval": "1h"}))
    record = orphan(h, h.lead(), "tick", "p1")
    h.at(2.5)
    assert h.coordination.get_run(record.run_id) == record  # nowhere better to go


def test_reconciliation_reads_only_the_records_of_active_runs_without_a_heartbeat(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h.set_jobs(make_job("tick", concurrency="allow"))
    h.lead()
    h.at(0)
    h.at(1)
    h.at(2)
    running, waiting = h.records()
    assert h.coordination.claim_run(running.run_id, "p1", running.slot) is not None
    read: list[list[str]] = []
    get_runs = h.coordination.get_runs
    monkeypatch.setattr(
        h.coordination, "get_runs", lambda ids: read.append(list(ids)) or get_runs(ids)
    )
    monkeypatch.setattr(h.coordination, "runs", lambda **_: pytest.fail("every record was read"))

    h.at(3.5)  # a pass that records slot 3, and a reconciliation (every second)

    # The assigned runs are read, not the running one: it has a heartbeat (a live peer).
    third = run_id_for("tick", T0 + timedelta(seconds=3))
    assert read == [[waiting.run_id, third]]


def test_a_run_pinned_to_a_peer_that_is_gone_fails_with_the_reason(h: Harness) -> None:
    h.set_jobs(
        make_job("tick", schedule={"interval": "1h"}),
        nodes={"n1": local_node("n1"), "pinned": pinned_node("pinned", "old")},
    )
    epoch = h.lead()
    record = orphan(h, epoch, "tick", "old", node="pinned")
    h.coordination.unregister_peer("old")
    h.at(1.2)
    failed = h.coordination.get_run(record.run_id)
    assert failed is not None and failed.state is RunState.FAILED
    assert "peer old is gone" in failed.reason and "pinned" in failed.reason
    report = h.reports.get(record.run_id)
    assert report is not None and report.state is RunState.FAILED


def test_a_run_whose_peer_was_lost_mid_run_ends_unknown_and_is_reported(h: Harness) -> None:
    h.set_jobs(make_job("tick", schedule={"interval": "1h"}))
    epoch = h.lead()
    record = orphan(h, epoch, "tick", "old")
    h.coordination.claim_run(record.run_id, "old", T0)
    h.at(0.1)
    assert h.coordination.get_run(record.run_id).state is RunState.RUNNING  # type: ignore[union-attr]

    h.coordination.unregister_peer("old")
    h.at(1.2)
    settled = h.coordination.get_run(record.run_id)
    assert settled is not None and settled.state is RunState.UNKNOWN
    assert "peer old was lost" in settled.reason and "outcome unknown" in settled.reason
    report = h.reports.get(record.run_id)
    assert report is not None and report.state is RunState.UNKNOWN
    h.at(2.5)
    assert h.records(job_id="tick") == [settled]  # settled once, not run again


def test_a_lost_run_whose_report_was_written_takes_the_reports_outcome(h: Harness) -> None:
    h.set_jobs(make_job("tick", schedule={"interval": "1h"}))
    epoch = h.lead()
    record = orphan(h, epoch, "tick", "old")
    claimed = h.coordination.claim_run(record.run_id, "old", T0)
    assert claimed is not None
    ended = T0 + timedelta(seconds=1)
    h.reports.write(
        [RunReport.from_record(claimed, state=RunState.SUCCEEDED, exit_code=0, ended_at=ended)]
    )
    h.coordination.unregister_peer("old")  # died between its report and its record
    h.at(1.2)
    settled = h.coordination.get_run(record.run_id)
    assert settled is not None
    assert (settled.state, settled.exit_code, settled.ended_at) == (RunState.SUCCEEDED, 0, ended)


def test_an_at_least_once_run_lost_mid_run_is_assigned_again_under_its_id(h: Harness) -> None:
    h.set_jobs(make_job("tick", schedule={"interval": "1h"}, delivery="at_least_once"))
    epoch = h.lead()
    record = orphan(h, epoch, "tick", "old", at_least_once=True)
    h.coordination.claim_run(record.run_id, "old", T0)
    h.coordination.unregister_peer("old")
    h.at(1.2)
    again = h.coordination.get_run(record.run_id)
    assert again is not None
    assert (again.state, again.peer_id, again.started_at) == (RunState.ASSIGNED, "p1", None)
    assert "at_least_once" in again.reason


def test_finished_runs_leave_the_coordination_store_after_the_retention(h: Harness) -> None:
    h.scheduler = Scheduler(
        h.coordination, h.reports, lambda: h.config, h.clock, ["local"], timedelta(seconds=2)
    )
    h.set_jobs(make_job("tick", concurrency="allow"))
    h.lead()
    h.at(0)
    h.at(1.0)
    (first,) = h.records()
    h.coordination.finish_run(first.run_id, RunState.SUCCEEDED, ended_at=T0 + timedelta(seconds=1))
    h.at(2.5)
    assert h.coordination.get_run(first.run_id) is not None  # ended 1.5 s ago: kept
    h.at(3.6)
    assert h.coordination.get_run(first.run_id) is None
    assert [r.state for r in h.records()] == [RunState.ASSIGNED] * 2  # active runs stay


def test_beyond_the_retention_count_the_oldest_finished_runs_leave_sooner(h: Harness) -> None:
    """ZooKeeper holds its data in memory: at a high run rate the count, not the time,
    bounds what stays. A prune also comes once half the count was recorded since the last."""
    h.scheduler = Scheduler(
        h.coordination,
        h.reports,
        lambda: h.config,
        h.clock,
        ["local"],
        timedelta(hours=1),
        retention_count=4,
    )
    h.set_jobs(*(make_job(f"tick-{i}", concurrency="allow") for i in range(3)))
    h.lead()
    h.at(0)
    for second in (1.0, 2.0):  # each pass records 3 runs, half the count or more: it prunes
        h.at(second)
        for record in h.records(states=[RunState.ASSIGNED]):
            h.coordination.finish_run(record.run_id, RunState.SUCCEEDED, ended_at=h.clock.now())
    assert len(h.records()) == 6  # 4 finished records kept at most: none was beyond yet
    h.at(3.0)
    kept = h.records()
    slots = sorted(r.slot for r in kept if r.state.terminal)
    assert slots == [T0 + timedelta(seconds=1)] + [T0 + timedelta(seconds=2)] * 3
    assert len([r for r in kept if r.state is RunState.ASSIGNED]) == 3  # slot 3's: they stay


def test_run_all_catch_up_runs_do_not_make_the_next_slots_skip(h: Harness) -> None:
    job = make_job("tick", misfire="run_all")  # concurrency: forbid (the default)
    caught_up = restart_after_gap(h, job, 6.5)
    assert [r.state for r in caught_up] == [RunState.ASSIGNED] * 4  # still active
    h.at(7)
    (regular,) = [r for r in h.records() if r.slot == T0 + timedelta(seconds=7)]
    assert (regular.state, regular.trigger) == (RunState.ASSIGNED, Trigger.SCHEDULE)
    h.at(8)  # a regular run still active: slot 8 waits for it (run_all), at most until slot 9
    assert [r for r in h.records() if r.slot == T0 + timedelta(seconds=8)] == []
    h.at(9)
    (skipped,) = [r for r in h.records() if r.slot == T0 + timedelta(seconds=8)]
    assert skipped.state is RunState.SKIPPED and regular.run_id in skipped.reason
    assert "waited for it" in skipped.reason
    assert skipped.created_at == T0 + timedelta(seconds=9)


def start_run_all_job_with_its_first_run_active(
    h: Harness, first_slot: float = 1, **fields: Any
) -> RunRecord:
    """A run_all, forbid job led from T0; its first slot recorded and still running."""
    h.set_jobs(make_job("tick", **{"misfire": "run_all", **fields}))
    h.lead()
    h.at(0)
    h.at(first_slot)
    (first,) = h.records()
    h.coordination.claim_run(first.run_id, "p1", first.slot)
    return first


def test_a_run_all_slot_waits_for_the_previous_run_and_runs_when_it_ends(h: Harness) -> None:
    first = start_run_all_job_with_its_first_run_active(h)
    h.at(2.0)  # run 1 started late (say): it is still running at slot 2
    h.at(2.3)
    assert h.records() == [h.coordination.get_run(first.run_id)]
    assert h.scheduler._sleep_time() <= HOLD_POLL.total_seconds()  # it looks again soon
    h.coordination.finish_run(
        first.run_id, RunState.SUCCEEDED, ended_at=T0 + timedelta(seconds=2.4)
    )
    h.at(2.4)
    (second,) = [r for r in h.records() if r.slot == T0 + timedelta(seconds=2)]
    assert (second.state, second.trigger) == (RunState.ASSIGNED, Trigger.SCHEDULE)
    assert second.created_at == T0 + timedelta(seconds=2.4)
    assert h.coordination.cursors() == {"tick": T0 + timedelta(seconds=2)}
    h.at(3)  # and the schedule goes on: slot 3 waits for run 2 in turn
    assert [r.slot for r in h.records()] == [T0 + timedelta(seconds=s) for s in (1, 2)]


def test_a_run_all_slot_waits_no_longer_than_its_misfire_grace(h: Harness) -> None:
    first = start_run_all_job_with_its_first_run_active(
        h, 10, schedule={"interval": "10s"}, misfire={"policy": "run_all", "grace": "2s"}
    )
    assert first.slot == T0 + timedelta(seconds=10)
    h.at(20)
    h.at(21.9)
    assert h.records() == [h.coordination.get_run(first.run_id)]
    h.at(22)
    (skipped,) = [r for r in h.records() if r.slot == T0 + timedelta(seconds=20)]
    assert skipped.state is RunState.SKIPPED and first.run_id in skipped.reason
    assert skipped.created_at == T0 + timedelta(seconds=22)


def test_run_once_catch_up_run_still_blocks_a_forbid_slot(h: Harness) -> None:
    restart_after_gap(h, make_job("tick", misfire="run_once"), 6.5)
    h.at(7)
    (next_slot,) = [r for r in h.records() if r.slot == T0 + timedelta(seconds=7)]
    assert next_slot.state is RunState.SKIPPED


def test_a_slot_is_recorded_within_the_lookahead_before_it_is_due(h: Harness) -> None:
    h.set_jobs(make_job("tick"))
    h.lead()
    h.at(0)
    # The loop wakes LOOKAHEAD before the next slot: the pass, the write and the claim
    # happen before the slot.
    assert h.scheduler._sleep_time() == pytest.approx(1.0 - LOOKAHEAD.total_seconds())
    ahead = (LOOKAHEAD + PASS_SPAN).total_seconds()  # the farthest a pass looks
    h.at(1.0 - ahead - 0.001)
    assert h.records() == []
    h.at(1.0 - ahead)
    (run,) = h.records()
    assert (run.slot, run.state) == (T0 + timedelta(seconds=1), RunState.ASSIGNED)
    assert run.created_at == T0 + timedelta(seconds=1) - LOOKAHEAD - PASS_SPAN


def fuzzy_jobs_due_at(offsets_ms: list[float]) -> list[JobSpec]:
    """``every: 1s`` fuzzy jobs whose slots fall about these many ms into each second."""
    jobs: list[JobSpec] = []
    for target in offsets_ms:
        job_id = next(
            f"j{i}"
            for i in range(100_000)
            if abs(fuzzy_offset(f"j{i}", timedelta(seconds=1)) / timedelta(milliseconds=1) - target)
            < 2
            and f"j{i}" not in [j.id for j in jobs]
        )
        jobs.append(make_job(job_id, schedule={"every": "1s", "fuzzy": True}, concurrency="allow"))
    return jobs


def test_a_pass_records_together_the_slots_due_within_its_span(h: Harness) -> None:
    first, near, far = fuzzy_jobs_due_at([500, 500 + 40, 500 + 120])
    h.set_jobs(first, near, far)
    h.lead()
    h.at(0)
    h.at(1.0)  # the first slots
    h.at(1.5 - LOOKAHEAD.total_seconds())  # one pass: near falls within its span, far not
    batch = [r for r in h.records() if r.created_at == h.clock.now()]
    assert sorted(r.job_id for r in batch) == sorted([first.id, near.id])
    # Then the loop sleeps until far's slot is LOOKAHEAD away.
    far_slot = next_slot(far.schedule, far.id, h.clock.now())
    wake = (far_slot - LOOKAHEAD - h.clock.now()).total_seconds()
    assert h.scheduler._sleep_time() == pytest.approx(wake)


def test_a_slot_whose_previous_run_is_active_is_decided_at_its_instant(h: Harness) -> None:
    h.set_jobs(make_job("tick"))
    h.lead()
    h.at(0)
    lead = LOOKAHEAD.total_seconds()
    h.at(1.0)
    (first,) = h.records()
    h.at(2.0 - lead / 2)  # slot 2 is inside the lookahead, but run 1 is still assigned
    assert h.records() == [first]
    h.coordination.claim_run(first.run_id, "p1", T0 + timedelta(seconds=1))
    h.coordination.finish_run(
        first.run_id, RunState.SUCCEEDED, ended_at=T0 + timedelta(seconds=2) - LOOKAHEAD / 4
    )
    h.at(2.0)  # run 1 ended before slot 2: slot 2 runs, instead of being skipped early
    states = {r.run_id: r.state for r in h.records()}
    assert states[run_id_for("tick", T0 + timedelta(seconds=2))] is RunState.ASSIGNED


def test_a_held_slot_is_skipped_at_its_instant_when_the_run_is_still_active(h: Harness) -> None:
    h.set_jobs(make_job("tick"))
    h.lead()
    h.at(0)
    h.at(1.0)
    h.at(2.0 - LOOKAHEAD.total_seconds() / 2)
    h.at(2.0)
    skipped = [r for r in h.records() if r.state is RunState.SKIPPED]
    assert [r.slot for r in skipped] == [T0 + timedelta(seconds=2)]
    assert skipped[0].created_at == T0 + timedelta(seconds=2)


class _PruneFails:
    """Makes the store's prune wait until released, then fail as a closed client does."""

    def __init__(self, h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        monkeypatch.setattr(h.coordination, "prune_runs", self._prune)

    def _prune(self, finished_before: datetime, keep: int | None = None) -> int:
        self.entered.set()
        assert self.release.wait(10)
        raise StoreUnavailable("ZooKeeper: ConnectionLoss()")


def _prune_while(h: Harness, monkeypatch: pytest.MonkeyPatch, stop_first: bool) -> None:
    """Lead on a thread (its first pass prunes, on the pruner thread); let that prune fail."""
    fails = _PruneFails(h, monkeypatch)
    h.lead(thread=True)
    assert fails.entered.wait(10)
    pruner = h.scheduler._pruner
    assert pruner is not None
    if stop_first:
        h.scheduler.stop()
    fails.release.set()
    pruner.join(10)
    assert not pruner.is_alive()
    h.scheduler.stop()


def test_a_prune_cut_short_by_the_schedulers_stop_is_not_an_error(
    h: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A stopping peer closes its store under the pruner thread: that is no failure."""
    caplog.set_level(logging.INFO, logger="distcrond.scheduler")
    _prune_while(h, monkeypatch, stop_first=True)
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert any("pruning stopped with the scheduler" in r.getMessage() for r in caplog.records)


def test_a_prune_that_fails_while_scheduling_is_an_error(
    h: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="distcrond.scheduler")
    _prune_while(h, monkeypatch, stop_first=False)
    (error,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "pruning finished run records failed" in error.getMessage()
