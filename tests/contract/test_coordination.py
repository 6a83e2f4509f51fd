"""The coordination store contract: what every backend (SQLite, ZooKeeper) promises.

Only the abstract interface is used here. Callbacks may arrive on a store
thread, so the tests wait for them with deadlines, never with sleeps.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest

from distcrond.coordination.base import (
    ConfigSnapshot,
    CoordinationStore,
    FencedOut,
    Finish,
    NodeHealth,
    PeerInfo,
    TriggerRequest,
)
from distcrond.runs import RunRecord, RunState, Trigger, run_id_for

T0 = datetime(2026, 11, 27, 3, 10, tzinfo=UTC)
DEADLINE = 5.0


def slot(i: int) -> datetime:
    return T0 + timedelta(minutes=i)


def assigned(job_id: str, i: int, *, peer_id: str = "p1", node_id: str = "n1") -> RunRecord:
    return RunRecord(
        run_id=run_id_for(job_id, slot(i)),
        job_id=job_id,
        slot=slot(i),
        node_id=node_id,
        peer_id=peer_id,
        state=RunState.ASSIGNED,
        created_at=slot(i) + timedelta(microseconds=123),
    )


def eventually(predicate: Callable[[], bool], timeout: float = DEADLINE) -> None:
    """Wait until ``predicate()`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        time.sleep(0.005)  # polling a condition with a deadline, not synchronising by sleep


class Listener:
    """A LeadershipListener that records what it is told."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int | None]] = []
        self._lock = threading.Lock()

    def establish_leadership(self, epoch: int) -> None:
        with self._lock:
            self.events.append(("establish", epoch))

    def revoke_leadership(self) -> None:
        with self._lock:
            self.events.append(("revoke", None))

    def count(self, kind: str) -> int:
        with self._lock:
            return sum(1 for k, _ in self.events if k == kind)

    def epoch(self) -> int:
        """The epoch of the last establish_leadership, once it has come."""
        eventually(lambda: self.count("establish") > 0)
        with self._lock:
            return next(e for k, e in reversed(self.events) if k == "establish" and e is not None)


class RunEvents:
    """A watch_runs callback: records every call, flags (run id, event) seen twice."""

    def __init__(self) -> None:
        self.records: list[RunRecord] = []
        self.duplicate = threading.Event()
        self._seen: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def __call__(self, record: RunRecord) -> None:
        kind = "cancel" if record.cancel_requested else "assigned"
        with self._lock:
            if (record.run_id, kind) in self._seen:
                self.duplicate.set()
            self._seen.add((record.run_id, kind))
            self.records.append(record)

    def has(self, run_id: str, kind: str) -> bool:
        with self._lock:
            return (run_id, kind) in self._seen

    def run_ids(self) -> set[str]:
        with self._lock:
            return {r.run_id for r in self.records}


@pytest.fixture
def listener() -> Listener:
    return Listener()


@pytest.fixture
def epoch(coordination: CoordinationStore, listener: Listener) -> Iterator[int]:
    """This store's peer "p1" is leader; the value is its epoch."""
    coordination.start_election("p1", listener)
    yield listener.epoch()
    coordination.stop_election()


# -- leadership -------------------------------------------------------------------


def test_no_leader_before_an_election(coordination: CoordinationStore) -> None:
    assert coordination.leader() is None


def test_standing_peer_becomes_leader_and_is_told_its_epoch(
    coordination: CoordinationStore, listener: Listener
) -> None:
    coordination.start_election("p1", listener)
    epoch = listener.epoch()

    leader = coordination.leader()
    assert leader is not None
    assert (leader.peer_id, leader.epoch) == ("p1", epoch)
    assert leader.since.tzinfo is not None


def test_stop_election_revokes_leadership(
    coordination: CoordinationStore, listener: Listener
) -> None:
    coordination.start_election("p1", listener)
    listener.epoch()

    coordination.stop_election()

    eventually(lambda: listener.count("revoke") == 1)
    leader = coordination.leader()
    assert leader is None or leader.peer_id != "p1"


def test_stop_election_when_not_standing_does_nothing(coordination: CoordinationStore) -> None:
    coordination.stop_election()
    assert coordination.leader() is None


def test_a_new_election_has_a_higher_epoch_and_fences_the_old_one(
    coordination: CoordinationStore,
) -> None:
    first, second = Listener(), Listener()
    coordination.start_election("p1", first)
    old = first.epoch()
    coordination.stop_election()
    eventually(lambda: first.count("revoke") == 1)

    coordination.start_election("p1", second)
    new = second.epoch()

    assert new > old
    with pytest.raises(FencedOut):
        coordination.record_runs(old, [assigned("backup", 0)])
    assert coordination.get_run(assigned("backup", 0).run_id) is None
    assert coordination.record_runs(new, [assigned("backup", 0)]) == [assigned("backup", 0)]
    coordination.stop_election()


def test_record_runs_without_leadership_is_fenced(
    coordination: CoordinationStore, listener: Listener
) -> None:
    coordination.start_election("p1", listener)
    epoch = listener.epoch()
    coordination.stop_election()
    eventually(lambda: listener.count("revoke") == 1)

    with pytest.raises(FencedOut):
        coordination.record_runs(epoch, [assigned("backup", 0)])


def test_resign_hands_leadership_over_and_the_peer_contends_again(
    coordination: CoordinationStore, listener: Listener
) -> None:
    coordination.start_election("p1", listener)
    old = listener.epoch()

    coordination.resign(old)

    # Alone in the election, the peer wins it again, with a new epoch that fences the old.
    eventually(lambda: listener.count("revoke") == 1 and listener.count("establish") == 2)
    new = listener.epoch()
    assert new > old
    leader = coordination.leader()
    assert leader is not None and (leader.peer_id, leader.epoch) == ("p1", new)
    with pytest.raises(FencedOut):
        coordination.record_runs(old, [assigned("backup", 0)])
    coordination.stop_election()


def test_resign_of_an_epoch_no_longer_held_does_nothing(
    coordination: CoordinationStore, listener: Listener
) -> None:
    coordination.start_election("p1", listener)
    old = listener.epoch()
    coordination.resign(old)
    eventually(lambda: listener.count("establish") == 2)
    new = listener.epoch()

    coordination.resign(old)  # stale: the current term goes on
    assert coordination.record_runs(new, [assigned("backup", 0)]) == [assigned("backup", 0)]
    assert listener.count("revoke") == 1
    leader = coordination.leader()
    assert leader is not None and leader.epoch == new
    coordination.stop_election()


def test_resign_when_not_standing_does_nothing(coordination: CoordinationStore) -> None:
    coordination.resign(1)
    assert coordination.leader() is None


def test_the_newest_scheduler_pass_published_is_read_back(
    coordination: CoordinationStore,
) -> None:
    from distcrond.coordination.base import SchedulerPass

    assert coordination.scheduler_pass() is None
    for peer_id, epoch, after in (("p1", 3, 0.25), ("p2", 4, 0.5)):
        ended = datetime.now(UTC) - timedelta(seconds=after)  # the pass ended this long ago
        coordination.publish_scheduler_pass(SchedulerPass(peer_id, epoch, ended, 2.5, after))

        def read_back(p: str = peer_id) -> bool:
            got = coordination.scheduler_pass()
            return got is not None and got.peer_id == p

        eventually(read_back)
        got = coordination.scheduler_pass()
        assert got is not None and (got.epoch, got.stall_timeout) == (epoch, 2.5)
        # On the store's clock (ZooKeeper: the ensemble's, here on this machine's).
        assert abs((got.at - ended).total_seconds()) < 1.0


# -- recording runs ---------------------------------------------------------------


def test_record_runs_returns_the_created_runs_and_stores_every_field(
    coordination: CoordinationStore, epoch: int
) -> None:
    run = RunRecord(
        run_id=run_id_for("backup", slot(0), "n2"),
        job_id="backup",
        slot=slot(0),
        node_id="n2",
        peer_id="p1",
        state=RunState.ASSIGNED,
        trigger=Trigger.MANUAL,
        attempt=1,
        epoch=epoch,
        created_at=slot(0) + timedelta(microseconds=1),
        reason="manual run by alice",
        at_least_once=True,
    )

    assert coordination.record_runs(epoch, [run]) == [run]
    assert coordination.get_run(run.run_id) == run


def test_a_run_is_recorded_once(coordination: CoordinationStore, epoch: int) -> None:
    first = assigned("backup", 0, peer_id="p1")
    again = assigned("backup", 0, peer_id="p2")

    assert coordination.record_runs(epoch, [first]) == [first]
    assert coordination.record_runs(epoch, [again, assigned("backup", 1)]) == [
        assigned("backup", 1)
    ]

    stored = coordination.get_run(first.run_id)
    assert stored is not None and stored.peer_id == "p1"


def test_a_repeated_id_in_one_batch_is_recorded_once(
    coordination: CoordinationStore, epoch: int
) -> None:
    first = assigned("backup", 0, peer_id="p1")

    created = coordination.record_runs(epoch, [first, assigned("backup", 0, peer_id="p2")])

    assert created == [first]
    assert len(coordination.runs()) == 1


def test_a_fenced_batch_writes_nothing(coordination: CoordinationStore, epoch: int) -> None:
    coordination.record_runs(epoch, [], cursors={"backup": slot(0)})

    with pytest.raises(FencedOut):
        coordination.record_runs(
            epoch + 1,
            [assigned("backup", 1), assigned("report", 1)],
            cursors={"backup": slot(1), "report": slot(1)},
        )

    assert coordination.runs() == []
    assert coordination.cursors() == {"backup": slot(0)}


def test_cursors_only_move_forward(coordination: CoordinationStore, epoch: int) -> None:
    assert coordination.cursors() == {}
    coordination.record_runs(epoch, [], cursors={"backup": slot(5), "report": slot(1)})
    coordination.record_runs(epoch, [], cursors={"backup": slot(3), "report": slot(2)})

    assert coordination.cursors() == {"backup": slot(5), "report": slot(2)}


def test_get_run_of_an_unknown_id_is_none(coordination: CoordinationStore) -> None:
    assert coordination.get_run("nope@2026-01-01T00:00:00.000000Z") is None


def test_runs_filter_by_job_peer_and_state_oldest_slot_first(
    coordination: CoordinationStore, epoch: int
) -> None:
    runs = [
        assigned("backup", 2, peer_id="p1"),
        assigned("backup", 0, peer_id="p2"),
        assigned("report", 1, peer_id="p1"),
        assigned("backup", 1, peer_id="p1"),
    ]
    coordination.record_runs(epoch, runs)
    coordination.claim_run(runs[3].run_id, "p1", slot(1))

    def ids(records: list[RunRecord]) -> list[str]:
        return [r.run_id for r in records]

    assert ids(coordination.runs()) == ids([runs[1], runs[3], runs[2], runs[0]])
    assert ids(coordination.runs(job_id="backup")) == ids([runs[1], runs[3], runs[0]])
    assert ids(coordination.runs(peer_id="p1")) == ids([runs[3], runs[2], runs[0]])
    assert ids(coordination.runs(states=[RunState.RUNNING])) == ids([runs[3]])
    assert ids(coordination.runs(job_id="backup", peer_id="p1", states=[RunState.ASSIGNED])) == ids(
        [runs[0]]
    )
    assert coordination.runs(job_id="nope") == []


# -- claiming, updating, finishing ----------------------------------------------------


def test_claim_moves_an_assigned_run_to_running(
    coordination: CoordinationStore, epoch: int
) -> None:
    run = assigned("backup", 0)
    coordination.record_runs(epoch, [run])
    started = slot(0) + timedelta(seconds=1, microseconds=7)

    claimed = coordination.claim_run(run.run_id, "p1", started)

    assert claimed == run.replace(state=RunState.RUNNING, started_at=started)
    assert coordination.get_run(run.run_id) == claimed


def test_only_one_of_many_concurrent_claims_wins(
    coordination: CoordinationStore, epoch: int
) -> None:
    run = assigned("backup", 0)
    coordination.record_runs(epoch, [run])
    contenders = 8
    barrier = threading.Barrier(contenders)
    results: list[RunRecord | None] = []
    lock = threading.Lock()

    def claim() -> None:
        barrier.wait()
        result = coordination.claim_run(run.run_id, "p1", slot(0))
        with lock:
            results.append(result)

    threads = [threading.Thread(target=claim) for _ in range(contenders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE)

    assert len(results) == contenders
    assert sum(1 for r in results if r is not None) == 1


def test_claim_fails_for_another_peer_a_running_run_or_an_unknown_run(
    coordination: CoordinationStore, epoch: int
) -> None:
    run = assigned("backup", 0, peer_id="p1")
    coordination.record_runs(epoch, [run])

    assert coordination.claim_run(run.run_id, "p2", slot(0)) is None
    assert coordination.claim_run(run.run_id, "p1", slot(0)) is not None
    assert coordination.claim_run(run.run_id, "p1", slot(0)) is None
    assert coordination.claim_run("nope@2026-01-01T00:00:00.000000Z", "p1", slot(0)) is None


def test_finish_is_idempotent_and_a_terminal_state_sticks(
    coordination: CoordinationStore, epoch: int
) -> None:
    run = assigned("backup", 0)
    coordination.record_runs(epoch, [run])
    coordination.claim_run(run.run_id, "p1", slot(0))
    ended = slot(0) + timedelta(seconds=3)

    finished = coordination.finish_run(
        run.run_id, RunState.SUCCEEDED, ended_at=ended, exit_code=0, reason=""
    )
    assert finished is not None
    assert (finished.state, finished.ended_at, finished.exit_code) == (
        RunState.SUCCEEDED,
        ended,
        0,
    )

    again = coordination.finish_run(
        run.run_id, RunState.FAILED, ended_at=ended + timedelta(seconds=1), exit_code=1
    )
    assert again == finished
    assert coordination.get_run(run.run_id) == finished
    assert coordination.claim_run(run.run_id, "p1", slot(0)) is None


def test_an_assigned_run_can_finish_without_running(
    coordination: CoordinationStore, epoch: int
) -> None:
    run = assigned("backup", 0)
    coordination.record_runs(epoch, [run])

    skipped = coordination.finish_run(
        run.run_id, RunState.SKIPPED, ended_at=slot(0), reason="concurrency: forbid"
    )

    assert skipped is not None
    assert (skipped.state, skipped.reason, skipped.exit_code) == (
        RunState.SKIPPED,
        "concurrency: forbid",
        None,
    )


def test_finish_of_an_unknown_run_is_none(coordination: CoordinationStore) -> None:
    assert (
        coordination.finish_run(
            "nope@2026-01-01T00:00:00.000000Z", RunState.FAILED, ended_at=slot(0)
        )
        is None
    )


def test_update_run_changes_active_runs_only(coordination: CoordinationStore, epoch: int) -> None:
    run = assigned("backup", 0)
    coordination.record_runs(epoch, [run])

    updated = coordination.update_run(run.run_id, attempt=2, reason="retrying")
    assert updated == run.replace(attempt=2, reason="retrying")
    assert coordination.get_run(run.run_id) == updated

    coordination.finish_run(run.run_id, RunState.FAILED, ended_at=slot(1), exit_code=2)
    assert coordination.update_run(run.run_id, attempt=3) is None
    stored = coordination.get_run(run.run_id)
    assert stored is not None and (stored.attempt, stored.state) == (2, RunState.FAILED)
    assert coordination.update_run("nope@2026-01-01T00:00:00.000000Z", attempt=1) is None


def test_update_and_finish_with_expect_change_only_a_run_that_still_has_those_values(
    coordination: CoordinationStore, epoch: int
) -> None:
    run = assigned("backup", 0, peer_id="p1")
    coordination.record_runs(epoch, [run])
    coordination.claim_run(run.run_id, "p1", slot(0))

    running_on_p2 = {"state": RunState.RUNNING, "peer_id": "p2"}
    assert coordination.update_run(run.run_id, expect=running_on_p2, attempt=2) is None
    unchanged = coordination.finish_run(
        run.run_id, RunState.UNKNOWN, ended_at=slot(1), expect=running_on_p2
    )
    assert unchanged is not None and unchanged.state is RunState.RUNNING
    assert coordination.get_run(run.run_id) == unchanged

    running_on_p1 = {"state": RunState.RUNNING, "peer_id": "p1"}
    requeued = coordination.update_run(
        run.run_id, expect=running_on_p1, state=RunState.ASSIGNED, peer_id="p2"
    )
    assert requeued is not None and (requeued.state, requeued.peer_id) == (
        RunState.ASSIGNED,
        "p2",
    )
    # The same decision, taken again on the old read, no longer applies.
    assert (
        coordination.update_run(
            run.run_id, expect=running_on_p1, state=RunState.ASSIGNED, peer_id="p3"
        )
        is None
    )
    finished = coordination.finish_run(
        run.run_id,
        RunState.UNKNOWN,
        ended_at=slot(1),
        expect={"state": RunState.ASSIGNED, "peer_id": "p2"},
    )
    assert finished is not None and finished.state is RunState.UNKNOWN


def test_executing_runs_are_the_claimed_ones_until_they_finish(
    coordination: CoordinationStore, epoch: int
) -> None:
    coordination.register_peer(peer("p1"))
    first, second, third = (assigned("backup", i) for i in range(3))
    coordination.record_runs(epoch, [first, second, third])
    assert coordination.executing_runs() == set()

    coordination.claim_run(first.run_id, "p1", slot(0))
    coordination.claim_run(second.run_id, "p1", slot(1))
    assert coordination.executing_runs() == {first.run_id, second.run_id}

    coordination.finish_run(first.run_id, RunState.SUCCEEDED, ended_at=slot(1), exit_code=0)
    assert coordination.executing_runs() == {second.run_id}


def test_request_cancel_marks_active_runs_only(coordination: CoordinationStore, epoch: int) -> None:
    active, done = assigned("backup", 0), assigned("backup", 1)
    coordination.record_runs(epoch, [active, done])
    coordination.finish_run(done.run_id, RunState.SUCCEEDED, ended_at=slot(1), exit_code=0)

    assert coordination.request_cancel(active.run_id, "ops") is True
    assert coordination.request_cancel(active.run_id, "other") is True  # idempotent
    assert coordination.request_cancel(done.run_id) is False
    assert coordination.request_cancel("nope@2026-01-01T00:00:00.000000Z") is False
    stored = coordination.get_run(active.run_id)
    assert stored is not None and stored.cancel_requested
    assert stored.cancelled_by == "ops"  # the first request's name is kept
    finished = coordination.get_run(done.run_id)
    assert finished is not None and not finished.cancel_requested


def test_prune_removes_only_terminal_runs_that_ended_before_the_instant(
    coordination: CoordinationStore, epoch: int
) -> None:
    old, recent, active = assigned("backup", 0), assigned("backup", 1), assigned("backup", 2)
    coordination.record_runs(epoch, [old, recent, active])
    coordination.finish_run(old.run_id, RunState.SUCCEEDED, ended_at=slot(10), exit_code=0)
    coordination.finish_run(recent.run_id, RunState.FAILED, ended_at=slot(20), exit_code=1)

    assert coordination.prune_runs(slot(15)) == 1
    assert [r.run_id for r in coordination.runs()] == [recent.run_id, active.run_id]
    assert coordination.prune_runs(slot(15)) == 0
    assert coordination.prune_runs(slot(100)) == 1
    assert [r.run_id for r in coordination.runs()] == [active.run_id]


def test_prune_keeps_at_most_the_newest_terminal_runs_asked_for(
    coordination: CoordinationStore, epoch: int
) -> None:
    """``keep`` bounds the finished records whatever their age: the oldest slots go first,
    and active runs neither go nor count."""
    runs = [assigned("backup", i) for i in range(5)]
    coordination.record_runs(epoch, runs)
    for i, run in enumerate(runs[:4]):  # the last stays active
        coordination.finish_run(run.run_id, RunState.SUCCEEDED, ended_at=slot(10 + i), exit_code=0)

    assert coordination.prune_runs(slot(0), keep=2) == 2
    assert [r.run_id for r in coordination.runs()] == [r.run_id for r in runs[2:]]
    assert coordination.prune_runs(slot(0), keep=2) == 0
    assert coordination.prune_runs(slot(13), keep=10) == 1  # the time bound still applies
    assert [r.run_id for r in coordination.runs()] == [runs[3].run_id, runs[4].run_id]


# -- watching runs ------------------------------------------------------------------


def test_watch_runs_reports_existing_and_new_assignments_and_cancels_once_each(
    coordination: CoordinationStore, epoch: int
) -> None:
    existing, elsewhere = assigned("backup", 0, peer_id="p1"), assigned("backup", 1, peer_id="p2")
    coordination.record_runs(epoch, [existing, elsewhere])
    events = RunEvents()

    coordination.watch_runs("p1", events)
    eventually(lambda: events.has(existing.run_id, "assigned"))

    new = assigned("report", 2, peer_id="p1")
    coordination.record_runs(epoch, [new, assigned("report", 3, peer_id="p2")])
    eventually(lambda: events.has(new.run_id, "assigned"))

    coordination.claim_run(new.run_id, "p1", slot(2))
    coordination.request_cancel(new.run_id)
    coordination.request_cancel(new.run_id)
    eventually(lambda: events.has(new.run_id, "cancel"))
    coordination.request_cancel(elsewhere.run_id)

    # More writes that must not repeat anything already reported.
    coordination.update_run(new.run_id, reason="stopping")
    coordination.finish_run(new.run_id, RunState.FAILED, ended_at=slot(3), reason="cancelled")
    coordination.record_runs(epoch, [existing, new])
    last = assigned("report", 4, peer_id="p1")
    coordination.record_runs(epoch, [last])
    eventually(lambda: events.has(last.run_id, "assigned"))

    assert not events.duplicate.wait(0.3)
    assert events.run_ids() == {existing.run_id, new.run_id, last.run_id}
    cancel = next(r for r in events.records if r.cancel_requested)
    assert (cancel.run_id, cancel.state) == (new.run_id, RunState.RUNNING)
    assert all(r.peer_id == "p1" for r in events.records)


def test_a_failing_watch_callback_does_not_stop_later_events(
    coordination: CoordinationStore, epoch: int
) -> None:
    seen: list[str] = []

    def callback(record: RunRecord) -> None:
        seen.append(record.run_id)
        if len(seen) == 1:
            raise RuntimeError("boom")

    coordination.watch_runs("p1", callback)
    coordination.record_runs(epoch, [assigned("backup", 0)])
    eventually(lambda: len(seen) == 1)
    coordination.record_runs(epoch, [assigned("backup", 1)])
    eventually(lambda: len(seen) == 2)


# -- manual triggers ----------------------------------------------------------------


def trigger(job_id: str, i: int, requested_by: str = "p1") -> TriggerRequest:
    return TriggerRequest(
        run_id=run_id_for(job_id, slot(i)),
        job_id=job_id,
        slot=slot(i),
        requested_at=slot(i) + timedelta(microseconds=5),
        requested_by=requested_by,
    )


def test_triggers_round_trip_oldest_first_and_are_idempotent(
    coordination: CoordinationStore,
) -> None:
    assert coordination.pending_triggers() == []
    later, earlier = trigger("report", 2), trigger("backup", 1)

    coordination.request_trigger(later)
    coordination.request_trigger(earlier)
    coordination.request_trigger(later)

    assert coordination.pending_triggers() == [earlier, later]
    coordination.remove_trigger(earlier.run_id)
    coordination.remove_trigger(earlier.run_id)
    assert coordination.pending_triggers() == [later]


def test_watch_triggers_is_called_when_a_trigger_is_queued(
    coordination: CoordinationStore,
) -> None:
    calls = threading.Semaphore(0)
    coordination.watch_triggers(calls.release)

    coordination.request_trigger(trigger("backup", 1))

    assert calls.acquire(timeout=DEADLINE)
    assert [t.run_id for t in coordination.pending_triggers()] == [trigger("backup", 1).run_id]


# -- membership and configuration --------------------------------------------------------


def peer(peer_id: str, **changes: object) -> PeerInfo:
    info = PeerInfo(
        peer_id=peer_id,
        api_url=f"http://{peer_id}:8080",
        started_at=T0,
        version="0.1.0",
        roles=("db", "web"),
        config_digest="abc",
        pid=42,
        host=f"{peer_id}.example.org",
    )
    return PeerInfo(**{**info.__dict__, **changes})


def test_peers_register_update_and_unregister(coordination: CoordinationStore) -> None:
    assert coordination.peers() == []
    coordination.register_peer(peer("p2"))
    coordination.register_peer(peer("p1"))
    coordination.register_peer(peer("p1", config_digest="def"))

    assert coordination.peers() == [peer("p1", config_digest="def"), peer("p2")]

    coordination.unregister_peer("p2")
    coordination.unregister_peer("p2")
    assert coordination.peers() == [peer("p1", config_digest="def")]


def test_config_snapshots_are_published_and_read_per_peer(
    coordination: CoordinationStore,
) -> None:
    assert coordination.config("p1") is None
    snapshot = ConfigSnapshot(
        peer_id="p1",
        digest="d1",
        jobs={"backup": {"command": ["tar", "c", "/srv"], "schedule": {"interval": "1h"}}},
        nodes={"n1": {"connection_type": "local", "roles": ["db"]}},
        errors=[{"file": "jobs.d/bad.json", "field": "schedule", "reason": "ünknown unit"}],
        loaded_at=T0,
    )

    coordination.publish_config(snapshot)
    assert coordination.config("p1") == snapshot

    newer = ConfigSnapshot(peer_id="p1", digest="d2")
    coordination.publish_config(newer)
    assert coordination.config("p1") == newer
    assert coordination.config("p2") is None


def test_status_is_ok(coordination: CoordinationStore) -> None:
    status = coordination.status()
    assert status.ok
    assert status.backend == coordination.backend


# -- node health -------------------------------------------------------------------------


def test_node_health_is_recorded_replaced_and_cleared(coordination: CoordinationStore) -> None:
    assert coordination.node_health() == {}
    down = NodeHealth(
        node_id="db1",
        reason="connect to 10.0.0.7:22: connection refused",
        since=T0,
        failures=1,
        reported_by="p1",
        next_check=T0 + timedelta(seconds=1),
    )
    coordination.set_node_health(down)
    coordination.set_node_health(NodeHealth("web1", "timed out", T0))
    assert coordination.node_health() == {"db1": down, "web1": NodeHealth("web1", "timed out", T0)}

    again = down.__class__(**{**vars(down), "failures": 2, "next_check": T0 + timedelta(seconds=2)})
    coordination.set_node_health(again)
    assert coordination.node_health()["db1"] == again

    coordination.clear_node_health("db1")
    coordination.clear_node_health("db1")
    assert list(coordination.node_health()) == ["web1"]


def test_active_run_ids_are_the_ids_of_the_active_runs(
    coordination: CoordinationStore, epoch: int
) -> None:
    first, second = assigned("backup", 0), assigned("backup", 1)
    coordination.record_runs(epoch, [first, second])
    coordination.claim_run(second.run_id, "p1", slot(1))
    assert coordination.active_run_ids() == {first.run_id, second.run_id}
    coordination.finish_run(first.run_id, RunState.SUCCEEDED, ended_at=slot(1), exit_code=0)
    assert coordination.active_run_ids() == {second.run_id}


def test_the_scheduling_view_is_the_active_ids_the_peers_and_the_node_health_together(
    coordination: CoordinationStore, epoch: int
) -> None:
    empty = coordination.scheduling_view()
    assert (empty.active_run_ids, empty.node_health) == (set(), {})
    mine, theirs, done = (
        assigned("backup", 0),
        assigned("report", 0, peer_id="p2"),
        assigned("x", 0),
    )
    coordination.record_runs(epoch, [mine, theirs, done])
    coordination.claim_run(mine.run_id, "p1", slot(0))
    coordination.finish_run(done.run_id, RunState.SUCCEEDED, ended_at=slot(1), exit_code=0)
    coordination.register_peer(peer("p2"))
    coordination.register_peer(peer("p1"))
    coordination.set_node_health(NodeHealth("db1", "connection refused", T0))

    view = coordination.scheduling_view()
    assert view.active_run_ids == {mine.run_id, theirs.run_id} == coordination.active_run_ids()
    assert view.peers == [peer("p1"), peer("p2")] == coordination.peers()
    assert view.node_health == {"db1": NodeHealth("db1", "connection refused", T0)}


def test_claim_runs_claims_the_claimable_ones_in_one_call(
    coordination: CoordinationStore, epoch: int
) -> None:
    mine = [assigned("backup", i) for i in range(5)]
    theirs = assigned("report", 0, peer_id="p2")
    taken = assigned("sync", 0)
    coordination.record_runs(epoch, [*mine, theirs, taken])
    assert coordination.claim_run(taken.run_id, "p1", slot(0)) is not None
    now = slot(2) + timedelta(seconds=1)  # after the first three slots, before the others

    ids = [r.run_id for r in [*mine, theirs, taken]] + ["nope@2026-01-01T00:00:00.000000Z"]
    claimed = coordination.claim_runs(ids, "p1", now)

    assert sorted(claimed) == sorted(r.run_id for r in mine)
    for record in mine:
        # Claimed ahead of its slot, a run is recorded as started at its slot.
        started = max(now, record.slot)
        assert claimed[record.run_id] == record.replace(state=RunState.RUNNING, started_at=started)
        assert coordination.get_run(record.run_id) == claimed[record.run_id]
    assert coordination.claim_runs(ids, "p1", now) == {}  # nothing is claimed twice
    theirs_now = coordination.get_run(theirs.run_id)
    assert theirs_now is not None and theirs_now.state is RunState.ASSIGNED


def test_finish_runs_finishes_each_run_as_finish_run_would(
    coordination: CoordinationStore, epoch: int
) -> None:
    running = [assigned("backup", i) for i in range(4)]
    waiting = assigned("report", 0)
    done = assigned("sync", 0)
    coordination.record_runs(epoch, [*running, waiting, done])
    for record in [*running, done]:
        assert coordination.claim_run(record.run_id, "p1", record.slot) is not None
    first_end = coordination.finish_run(
        done.run_id, RunState.FAILED, ended_at=slot(9), exit_code=1, reason="first"
    )
    end = slot(5)
    finishes = [Finish(r.run_id, RunState.SUCCEEDED, end, 0) for r in running]
    finishes += [
        Finish(waiting.run_id, RunState.SKIPPED, end, None, "job removed"),
        Finish(done.run_id, RunState.SUCCEEDED, end, 0),  # already finished: stays as it was
        Finish("nope@2026-01-01T00:00:00.000000Z", RunState.SUCCEEDED, end, 0),
    ]

    after = coordination.finish_runs(finishes)

    for record in running:
        assert after[record.run_id] == coordination.get_run(record.run_id)
        assert after[record.run_id] == record.replace(
            state=RunState.SUCCEEDED, started_at=record.slot, ended_at=end, exit_code=0
        )
    skipped = coordination.get_run(waiting.run_id)
    assert skipped is not None and after[waiting.run_id] == skipped
    assert (skipped.state, skipped.reason) == (RunState.SKIPPED, "job removed")
    assert after[done.run_id] == first_end == coordination.get_run(done.run_id)
    assert after["nope@2026-01-01T00:00:00.000000Z"] is None
    assert coordination.active_run_ids() == set()
    assert coordination.executing_runs() == set()
