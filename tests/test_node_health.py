"""Node health: marks in the coordination store, backoff, probing, and re-placement of a run."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from distcrond.clock import Clock, FakeClock
from distcrond.config.loader import LoadedConfig
from distcrond.config.models import JobSpec, NodeSpec
from distcrond.coordination.sqlite import SQLiteCoordinationStore
from distcrond.execution.base import Runner, RunOutcome, RunRequest
from distcrond.execution.executor import Executor
from distcrond.execution.health import NodeHealthTracker
from distcrond.reporting.sqlite import SQLiteReportStore
from distcrond.runs import RunRecord, RunReport, RunState, run_id_for

T0 = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def ssh_node(node_id: str) -> NodeSpec:
    return NodeSpec.model_validate(
        {
            "id": node_id,
            "roles": ["web"],
            "connection_type": "ssh",
            "connection_options": {
                "ssh_user": "u",
                "ssh_host": f"{node_id}.example:22",
                "ssh_private_key_file": "/k",
            },
        }
    )


class Probe:
    """Answers for each node as told (None: it connects)."""

    def __init__(self) -> None:
        self.answers: dict[str, str | None] = {}
        self.asked: list[str] = []

    def __call__(self, node: NodeSpec) -> str | None:
        self.asked.append(node.id)
        return self.answers.get(node.id)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteCoordinationStore]:
    s = SQLiteCoordinationStore(tmp_path / "c.sqlite3")
    yield s
    s.close()


def tracker(store: SQLiteCoordinationStore, probe: Probe, clock: FakeClock) -> NodeHealthTracker:
    config = LoadedConfig.build({}, {"db1": ssh_node("db1"), "db2": ssh_node("db2")})
    return NodeHealthTracker(store, probe, lambda: config, "p1", clock)


def test_a_failing_node_is_marked_for_everybody_with_a_growing_backoff(
    store: SQLiteCoordinationStore,
) -> None:
    clock, probe = FakeClock(T0), Probe()
    health = tracker(store, probe, clock)
    health.failed("db1", "connection refused")
    first = store.node_health()["db1"]
    assert (first.reason, first.since, first.failures, first.reported_by) == (
        "connection refused",
        T0,
        1,
        "p1",
    )
    assert first.next_check == T0 + timedelta(seconds=1)
    assert health.unhealthy() == {"db1"}

    clock.set(T0 + timedelta(seconds=1))
    probe.answers["db1"] = "timed out"
    health.check()
    second = store.node_health()["db1"]
    assert (second.since, second.failures, second.reason) == (T0, 2, "timed out")
    assert second.next_check == T0 + timedelta(seconds=3)

    clock.set(T0 + timedelta(seconds=2))
    health.check()
    assert probe.asked == ["db1"]  # not due yet: not probed again


def test_a_node_that_answers_a_probe_is_healthy_again(store: SQLiteCoordinationStore) -> None:
    clock, probe = FakeClock(T0), Probe()
    health = tracker(store, probe, clock)
    health.failed("db1", "connection refused")
    clock.set(T0 + timedelta(seconds=1))
    health.check()
    assert store.node_health() == {} and health.unhealthy() == set()


def test_a_mark_of_a_node_that_is_gone_is_dropped(store: SQLiteCoordinationStore) -> None:
    clock, probe = FakeClock(T0), Probe()
    health = tracker(store, probe, clock)
    health.failed("old-node", "connection refused")
    health.check()
    assert store.node_health() == {} and probe.asked == []


class Refusing(Runner):
    """A runner whose node ``down`` cannot be reached; every other node runs the command."""

    connection_type = "ssh"

    def __init__(self) -> None:
        self.nodes: list[str] = []

    def run(self, request: RunRequest) -> RunOutcome:
        self.nodes.append(request.node_id)
        now = datetime.now(UTC)
        if request.node_id == "down":
            return RunOutcome(False, None, now, now, reason="connection refused", not_started=True)
        return RunOutcome(True, 0, now, now, stdout="ok\n")


def test_a_run_that_cannot_reach_its_node_moves_to_another_and_marks_it_unhealthy(
    tmp_path: Path, store: SQLiteCoordinationStore
) -> None:
    reports = SQLiteReportStore(tmp_path / "r.sqlite3")
    job = JobSpec.model_validate(
        {
            "id": "j",
            "schedule": {"interval": "1h"},
            "command": ["true"],
            "policy": {"hosts": "any", "roles": ["web"]},
            "retries": {"count": 1, "backoff": "1h"},
        }
    )
    config = LoadedConfig.build({"j": job}, {"down": ssh_node("down"), "up": ssh_node("up")})
    runner = Refusing()
    health = NodeHealthTracker(store, Probe(), lambda: config, "p1", Clock())
    executor = Executor(store, reports, {"ssh": runner}, lambda: config, "p1", Clock(), 4, health)

    class Epoch:
        got = threading.Event()
        value = 0

        def establish_leadership(self, epoch: int) -> None:
            self.value = epoch
            self.got.set()

        def revoke_leadership(self) -> None:
            pass

    listener = Epoch()
    store.start_election("p1", listener)
    assert listener.got.wait(5)
    slot = datetime.now(UTC)
    record = RunRecord(
        run_id=run_id_for("j", slot),
        job_id="j",
        slot=slot,
        node_id="down",
        peer_id="p1",
        state=RunState.ASSIGNED,
    )
    store.record_runs(listener.value, [record])
    executor.start()
    report: RunReport | None = None
    for _ in range(250):
        report = reports.get(record.run_id)
        if report is not None:
            break
        threading.Event().wait(0.02)
    executor.stop(grace=1)
    reports.close()

    assert report is not None and report.state is RunState.SUCCEEDED
    assert (report.node_id, report.attempts, runner.nodes) == ("up", 2, ["down", "up"])
    assert store.node_health()["down"].reason == "connection refused"
    stored = store.get_run(record.run_id)
    assert stored is not None and stored.node_id == "up"
