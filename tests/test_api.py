"""The REST API over real SQLite stores, through falcon's TestClient (no network)."""

from __future__ import annotations

import base64
import logging
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import falcon
import pytest
from falcon.testing import TestClient

import distcrond
from distcrond.api import create_app
from distcrond.api.limits import MAX_BODY_BYTES
from distcrond.clock import FakeClock
from distcrond.config.models import JobSpec, NodeSpec
from distcrond.coordination.base import (
    ConfigSnapshot,
    PeerInfo,
    SchedulerPass,
    StoreStatus,
    StoreUnavailable,
    TriggerRequest,
)
from distcrond.coordination.sqlite import SQLiteCoordinationStore
from distcrond.reporting.sqlite import SQLiteReportStore
from distcrond.runs import RunRecord, RunReport, RunState, format_slot, run_id_for

NOW = datetime(2026, 11, 27, 3, 0, tzinfo=UTC)
SLOT = datetime(2026, 11, 27, 2, 55, tzinfo=UTC)


# -- fixtures and builders ----------------------------------------------------


class Listener:
    def __init__(self) -> None:
        self.established = threading.Event()

    def establish_leadership(self, epoch: int) -> None:
        self.established.set()

    def revoke_leadership(self) -> None:
        pass


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


@pytest.fixture
def coordination(tmp_path: Path) -> Iterator[SQLiteCoordinationStore]:
    store = SQLiteCoordinationStore(tmp_path / "coordination.sqlite3")
    yield store
    store.close()


@pytest.fixture
def reports(tmp_path: Path) -> Iterator[SQLiteReportStore]:
    store = SQLiteReportStore(tmp_path / "reports.sqlite3")
    yield store
    store.close()


@pytest.fixture
def client(
    coordination: SQLiteCoordinationStore, reports: SQLiteReportStore, clock: FakeClock
) -> TestClient:
    return TestClient(create_app(coordination, reports, "peer-a", clock))


def job_dict(job_id: str, cron: str = "*/5 * * * *", **fields: Any) -> dict[str, Any]:
    spec = JobSpec.model_validate(
        {"id": job_id, "schedule": {"cron": cron}, "command": ["/bin/true"], **fields}
    )
    return spec.model_dump(mode="json")


def node_dict(node_id: str, **fields: Any) -> dict[str, Any]:
    return NodeSpec(id=node_id, **fields).model_dump(mode="json")


def publish(
    store: SQLiteCoordinationStore,
    peer_id: str = "peer-a",
    jobs: tuple[str, ...] = ("backup",),
    nodes: tuple[str, ...] = (),
    errors: tuple[dict[str, Any], ...] = (),
    digest: str = "digest-1",
    **job_fields: Any,
) -> None:
    store.publish_config(
        ConfigSnapshot(
            peer_id=peer_id,
            digest=digest,
            jobs={j: job_dict(j, **job_fields) for j in jobs},
            nodes={n: node_dict(n) for n in nodes},
            errors=list(errors),
            loaded_at=NOW,
        )
    )


def elect(path: Path, peer_id: str) -> SQLiteCoordinationStore:
    """Make ``peer_id`` leader through a store of its own (close it to abdicate)."""
    store = SQLiteCoordinationStore(path)
    listener = Listener()
    store.start_election(peer_id, listener)
    assert listener.established.wait(5)
    return store


@pytest.fixture
def leader(tmp_path: Path) -> Iterator[SQLiteCoordinationStore]:
    """peer-a is leader; returns its store, for fenced writes."""
    store = elect(tmp_path / "coordination.sqlite3", "peer-a")
    yield store
    store.close()


def epoch_of(store: SQLiteCoordinationStore) -> int:
    info = store.leader()
    assert info is not None
    return info.epoch


def record(
    job_id: str,
    slot: datetime,
    state: RunState = RunState.ASSIGNED,
    node_id: str | None = "node-1",
    run_id: str | None = None,
) -> RunRecord:
    return RunRecord(
        run_id=run_id or run_id_for(job_id, slot),
        job_id=job_id,
        slot=slot,
        node_id=node_id,
        peer_id="peer-a",
        state=state,
        created_at=slot,
    )


def report(
    job_id: str,
    slot: datetime,
    state: RunState = RunState.SUCCEEDED,
    node_id: str | None = "node-1",
    run_id: str | None = None,
    **fields: Any,
) -> RunReport:
    return RunReport(
        run_id=run_id or run_id_for(job_id, slot),
        job_id=job_id,
        slot=slot,
        state=state,
        node_id=node_id,
        peer_id="peer-a",
        started_at=slot,
        ended_at=slot + timedelta(seconds=2),
        exit_code=0 if state is RunState.SUCCEEDED else 1,
        **fields,
    )


def assert_error(result: Any, status: str) -> dict[str, Any]:
    assert result.status == status
    assert result.headers["content-type"].startswith("application/json")
    error = result.json["error"]
    assert isinstance(error["title"], str) and error["title"]
    assert isinstance(error["description"], str)
    return error


class FailingReports(SQLiteReportStore):
    def status(self) -> StoreStatus:
        return StoreStatus(ok=False, backend=self.backend, detail="disk on fire")


class UnreachableCoordination(SQLiteCoordinationStore):
    def peers(self) -> list[PeerInfo]:
        raise StoreUnavailable("session suspended")

    def status(self) -> StoreStatus:
        raise StoreUnavailable("session suspended")


class BuggyCoordination(SQLiteCoordinationStore):
    def peers(self) -> list[PeerInfo]:
        raise KeyError("a bug")


# -- health ---------------------------------------------------------------------


def passed(store: SQLiteCoordinationStore, at: datetime, stall_timeout: float = 5.0) -> None:
    """The leader (peer-a) published a completed scheduler pass at ``at``."""
    store.publish_scheduler_pass(SchedulerPass("peer-a", epoch_of(store), at, stall_timeout))


def test_health_is_ok_when_both_stores_answer_and_the_leader_passed_lately(
    client: TestClient, leader: SQLiteCoordinationStore, clock: FakeClock
) -> None:
    passed(leader, NOW)
    clock.advance(timedelta(seconds=2))
    result = client.simulate_get("/api/v1/health")
    assert result.status == falcon.HTTP_200
    assert result.json == {
        "status": "ok",
        "peer_id": "peer-a",
        "is_leader": True,
        "leader_id": "peer-a",
        "epoch": epoch_of(leader),
        "version": distcrond.__version__,
        "stores": {
            "coordination": result.json["stores"]["coordination"],
            "reports": result.json["stores"]["reports"],
        },
        "scheduler": {
            "ok": True,
            "last_pass": format_slot(NOW),
            "last_pass_epoch": epoch_of(leader),
            "last_pass_age_seconds": 2.0,
            "stall_timeout_seconds": 5.0,
            "detail": f"2.0 s since the last pass of epoch {epoch_of(leader)}",
        },
    }
    assert result.json["stores"]["coordination"]["ok"] is True
    assert result.json["stores"]["reports"]["backend"] == "sqlite"


def test_health_is_503_once_the_leaders_last_pass_is_older_than_its_stall_timeout(
    client: TestClient, leader: SQLiteCoordinationStore, clock: FakeClock
) -> None:
    passed(leader, NOW, stall_timeout=3.0)
    clock.advance(timedelta(seconds=3.5))
    result = client.simulate_get("/api/v1/health")
    assert result.status == falcon.HTTP_503
    assert result.json["status"] == "degraded"
    assert result.json["stores"]["coordination"]["ok"] is True
    scheduler = result.json["scheduler"]
    assert scheduler["ok"] is False
    assert scheduler["last_pass_age_seconds"] == 3.5
    assert scheduler["stall_timeout_seconds"] == 3.0
    assert "over the stall timeout of 3 s" in scheduler["detail"]


def test_health_is_503_when_no_leader_has_ever_scheduled(client: TestClient) -> None:
    result = client.simulate_get("/api/v1/health")
    assert result.status == falcon.HTTP_503
    assert result.json["leader_id"] is None
    assert result.json["scheduler"]["ok"] is False
    assert result.json["scheduler"]["detail"] == "no leader has scheduled yet"


def test_health_gives_a_new_leader_the_stall_timeout_for_its_first_pass(
    tmp_path: Path,
    coordination: SQLiteCoordinationStore,
    reports: SQLiteReportStore,
    leader: SQLiteCoordinationStore,
) -> None:
    info = leader.leader()
    assert info is not None
    # The previous leader's pass (an older epoch) says nothing about the new leader.
    leader.publish_scheduler_pass(SchedulerPass("peer-b", info.epoch - 1, info.since, 5.0))
    clock = FakeClock(info.since + timedelta(seconds=4))
    app = TestClient(create_app(coordination, reports, "peer-a", clock))
    first = app.simulate_get("/api/v1/health")
    assert first.status == falcon.HTTP_200
    assert first.json["scheduler"]["last_pass"] is None
    assert first.json["scheduler"]["detail"].startswith("4.0 s since leader peer-a took over")
    clock.advance(timedelta(seconds=2))
    assert app.simulate_get("/api/v1/health").status == falcon.HTTP_503


def test_health_is_503_when_the_last_leaders_pass_ages_and_no_leader_follows(
    client: TestClient, tmp_path: Path, clock: FakeClock
) -> None:
    store = elect(tmp_path / "coordination.sqlite3", "peer-a")
    passed(store, NOW)
    store.close()  # abdicates: no leader now
    clock.advance(timedelta(seconds=1))
    assert client.simulate_get("/api/v1/health").status == falcon.HTTP_200
    clock.advance(timedelta(seconds=5))
    result = client.simulate_get("/api/v1/health")
    assert result.status == falcon.HTTP_503
    assert result.json["scheduler"]["detail"].endswith("over the stall timeout of 5 s")
    assert "no leader now" in result.json["scheduler"]["detail"]


def test_health_names_this_peer_leader_with_its_epoch(
    client: TestClient, leader: SQLiteCoordinationStore
) -> None:
    body = client.simulate_get("/api/v1/health").json
    assert body["is_leader"] is True
    assert body["leader_id"] == "peer-a"
    assert body["epoch"] == epoch_of(leader)


def test_health_is_503_with_json_body_when_report_store_is_not_ok(
    tmp_path: Path, coordination: SQLiteCoordinationStore, clock: FakeClock
) -> None:
    reports = FailingReports(tmp_path / "reports.sqlite3")
    try:
        result = TestClient(create_app(coordination, reports, "peer-a", clock)).simulate_get(
            "/api/v1/health"
        )
    finally:
        reports.close()
    assert result.status == falcon.HTTP_503
    assert result.json["status"] == "degraded"
    assert result.json["stores"]["reports"] == {
        "ok": False,
        "backend": "sqlite",
        "detail": "disk on fire",
    }


def test_ready_on_a_follower_needs_only_its_stores_even_while_no_leader_schedules(
    client: TestClient, tmp_path: Path, coordination: SQLiteCoordinationStore, clock: FakeClock
) -> None:
    other = elect(tmp_path / "coordination.sqlite3", "peer-b")  # leads, then stalls
    try:
        passed(other, NOW)
        clock.advance(timedelta(seconds=60))
        assert client.simulate_get("/api/v1/health").status == falcon.HTTP_503
        result = client.simulate_get("/api/v1/health/ready")
        assert result.status == falcon.HTTP_200
        assert result.json == {
            "status": "ready",
            "peer_id": "peer-a",
            "is_leader": False,
            "reasons": [],
        }
    finally:
        other.close()
    reports = FailingReports(tmp_path / "failing.sqlite3")
    try:
        app = TestClient(create_app(coordination, reports, "peer-a", clock))
        down = app.simulate_get("/api/v1/health/ready")
    finally:
        reports.close()
    assert down.status == falcon.HTTP_503
    assert down.json["status"] == "not ready"
    assert down.json["reasons"] == ["reports store: disk on fire"]


def test_ready_on_the_leader_needs_a_recent_pass_of_its_scheduler(
    client: TestClient, leader: SQLiteCoordinationStore, clock: FakeClock
) -> None:
    passed(leader, NOW, stall_timeout=3.0)
    clock.advance(timedelta(seconds=2))
    fresh = client.simulate_get("/api/v1/health/ready")
    assert fresh.status == falcon.HTTP_200 and fresh.json["is_leader"] is True
    clock.advance(timedelta(seconds=2))
    stalled = client.simulate_get("/api/v1/health/ready")
    assert stalled.status == falcon.HTTP_503
    (reason,) = stalled.json["reasons"]
    assert reason.startswith("this peer leads and its scheduler stalls: 4.0 s since")


def test_health_is_503_when_coordination_status_raises(
    tmp_path: Path, reports: SQLiteReportStore, clock: FakeClock
) -> None:
    coordination = UnreachableCoordination(tmp_path / "coordination.sqlite3")
    try:
        result = TestClient(create_app(coordination, reports, "peer-a", clock)).simulate_get(
            "/api/v1/health"
        )
    finally:
        coordination.close()
    assert result.status == falcon.HTTP_503
    assert result.json["stores"]["coordination"]["ok"] is False
    assert "session suspended" in result.json["stores"]["coordination"]["detail"]


# -- cluster --------------------------------------------------------------------


def peer(peer_id: str, digest: str) -> PeerInfo:
    return PeerInfo(
        peer_id=peer_id,
        api_url=f"http://{peer_id}:8080",
        started_at=NOW,
        version="0.1.0",
        config_digest=digest,
    )


def test_cluster_without_leader_reports_no_drift(
    client: TestClient, coordination: SQLiteCoordinationStore
) -> None:
    coordination.register_peer(peer("peer-a", "d1"))
    coordination.register_peer(peer("peer-b", "d2"))
    body = client.simulate_get("/api/v1/cluster").json
    assert body["leader"] is None
    assert body["epoch"] is None
    assert body["drift"] == []
    assert [p["peer_id"] for p in body["peers"]] == ["peer-a", "peer-b"]
    assert all(p["is_leader"] is False and p["config_drift"] is False for p in body["peers"])


def test_cluster_flags_peers_whose_config_digest_differs_from_the_leaders(
    client: TestClient, coordination: SQLiteCoordinationStore, leader: SQLiteCoordinationStore
) -> None:
    coordination.register_peer(peer("peer-a", "d1"))
    coordination.register_peer(peer("peer-b", "d2"))
    coordination.register_peer(peer("peer-c", "d1"))
    body = client.simulate_get("/api/v1/cluster").json
    assert body["leader"] == {
        "peer_id": "peer-a",
        "epoch": epoch_of(leader),
        "since": body["leader"]["since"],
    }
    assert body["epoch"] == epoch_of(leader)
    assert body["drift"] == ["peer-b"]
    by_id = {p["peer_id"]: p for p in body["peers"]}
    assert by_id["peer-a"]["is_leader"] is True
    assert by_id["peer-b"]["is_leader"] is False
    assert by_id["peer-b"]["config_drift"] is True
    assert by_id["peer-c"]["config_drift"] is False
    assert by_id["peer-b"]["api_url"] == "http://peer-b:8080"


# -- jobs -----------------------------------------------------------------------


def test_jobs_is_empty_when_no_config_is_published(client: TestClient) -> None:
    assert client.simulate_get("/api/v1/jobs").json == {"jobs": []}


def test_jobs_lists_jobs_sorted_with_next_slot_and_last_run(
    client: TestClient, coordination: SQLiteCoordinationStore, reports: SQLiteReportStore
) -> None:
    publish(coordination, jobs=("zeta", "alpha"))
    reports.write([report("alpha", SLOT, RunState.FAILED)])
    jobs = client.simulate_get("/api/v1/jobs").json["jobs"]
    assert [j["id"] for j in jobs] == ["alpha", "zeta"]
    alpha = jobs[0]
    assert alpha["enabled"] is True
    assert alpha["schedule"] == {"cron": "*/5 * * * *", "timezone": "UTC"}
    assert alpha["policy"] == {"hosts": "any", "roles": []}
    assert alpha["next_slot"] == "2026-11-27T03:05:00.000000Z"
    assert alpha["last_run"] == {
        "run_id": run_id_for("alpha", SLOT),
        "state": "failed",
        "slot": format_slot(SLOT),
        "exit_code": 1,
        "ended_at": format_slot(SLOT + timedelta(seconds=2)),
    }
    assert jobs[1]["last_run"] is None


def test_jobs_next_slot_follows_the_scheduler_cursor_when_it_is_ahead_of_now(
    client: TestClient, coordination: SQLiteCoordinationStore, leader: SQLiteCoordinationStore
) -> None:
    publish(coordination)
    leader.record_runs(epoch_of(leader), [], cursors={"backup": NOW + timedelta(minutes=10)})
    [job] = client.simulate_get("/api/v1/jobs").json["jobs"]
    assert job["next_slot"] == "2026-11-27T03:15:00.000000Z"


def test_jobs_next_slot_is_null_for_a_disabled_job(
    client: TestClient, coordination: SQLiteCoordinationStore
) -> None:
    publish(coordination, enabled=False)
    [job] = client.simulate_get("/api/v1/jobs").json["jobs"]
    assert job["enabled"] is False
    assert job["next_slot"] is None


def test_jobs_shows_the_leaders_config_rather_than_this_peers(
    tmp_path: Path, client: TestClient, coordination: SQLiteCoordinationStore
) -> None:
    publish(coordination, "peer-a", jobs=("mine",))
    publish(coordination, "peer-b", jobs=("leaders",))
    other = elect(tmp_path / "coordination.sqlite3", "peer-b")
    try:
        jobs = client.simulate_get("/api/v1/jobs").json["jobs"]
    finally:
        other.close()
    assert [j["id"] for j in jobs] == ["leaders"]


def test_jobs_falls_back_to_this_peers_config_when_the_leader_published_none(
    tmp_path: Path, client: TestClient, coordination: SQLiteCoordinationStore
) -> None:
    publish(coordination, "peer-a", jobs=("mine",))
    other = elect(tmp_path / "coordination.sqlite3", "peer-b")
    try:
        jobs = client.simulate_get("/api/v1/jobs").json["jobs"]
    finally:
        other.close()
    assert [j["id"] for j in jobs] == ["mine"]


def test_job_shows_definition_active_runs_and_its_files_errors(
    client: TestClient, coordination: SQLiteCoordinationStore, leader: SQLiteCoordinationStore
) -> None:
    errors = (
        {"file": "/etc/distcron/jobs.d/backup.json", "field": "timeout", "reason": "bad"},
        {"file": "/etc/distcron/jobs.d/other.json", "field": "command", "reason": "missing"},
    )
    publish(coordination, jobs=("backup", "other"), errors=errors)
    leader.record_runs(
        epoch_of(leader),
        [record("backup", SLOT), record("backup", NOW, RunState.ASSIGNED)],
    )
    leader.claim_run(run_id_for("backup", SLOT), "peer-a", SLOT)
    body = client.simulate_get("/api/v1/jobs/backup").json
    assert body["job"] == job_dict("backup")
    assert body["next_slot"] == "2026-11-27T03:05:00.000000Z"
    assert body["last_run"] is None
    assert [(r["run_id"], r["state"]) for r in body["active_runs"]] == [
        (run_id_for("backup", NOW), "assigned"),
        (run_id_for("backup", SLOT), "running"),
    ]
    assert body["errors"] == [errors[0]]


def test_unknown_job_is_404_json(client: TestClient, coordination: SQLiteCoordinationStore) -> None:
    publish(coordination)
    error = assert_error(client.simulate_get("/api/v1/jobs/nope"), falcon.HTTP_404)
    assert "nope" in error["description"]


def test_unknown_job_with_a_broken_file_points_to_the_config_errors(
    client: TestClient, coordination: SQLiteCoordinationStore
) -> None:
    publish(
        coordination,
        jobs=(),
        errors=({"file": "jobs.d/broken.json", "field": "schedule", "reason": "required"},),
    )
    error = assert_error(client.simulate_get("/api/v1/jobs/broken"), falcon.HTTP_404)
    assert "/api/v1/config/errors" in error["description"]


# -- a job's runs -----------------------------------------------------------------


def test_runs_pages_through_history_newest_first_with_active_runs_on_the_first_page(
    client: TestClient,
    coordination: SQLiteCoordinationStore,
    reports: SQLiteReportStore,
    leader: SQLiteCoordinationStore,
) -> None:
    publish(coordination)
    slots = [SLOT - timedelta(minutes=5 * i) for i in range(7)]
    reports.write([report("backup", s) for s in slots])
    leader.record_runs(epoch_of(leader), [record("backup", NOW)])

    seen: list[str] = []
    actives: list[list[dict[str, Any]]] = []
    params: dict[str, Any] = {"limit": 3}
    while True:
        body = client.simulate_get("/api/v1/jobs/backup/runs", params=params).json
        assert body["job_id"] == "backup"
        seen += [r["slot"] for r in body["runs"]]
        actives.append(body["active"])
        if body["next_cursor"] is None:
            break
        params = {"limit": 3, "cursor": body["next_cursor"]}
    assert seen == [format_slot(s) for s in slots]
    assert [len(a) for a in actives] == [1, 0, 0]
    assert actives[0][0]["run_id"] == run_id_for("backup", NOW)


def test_runs_filters_by_state_node_and_time(
    client: TestClient, coordination: SQLiteCoordinationStore, reports: SQLiteReportStore
) -> None:
    publish(coordination)
    reports.write(
        [
            report("backup", SLOT, RunState.FAILED, node_id="node-1"),
            report("backup", SLOT - timedelta(minutes=5), RunState.SUCCEEDED, node_id="node-2"),
            report("backup", SLOT - timedelta(minutes=10), RunState.UNKNOWN, node_id="node-1"),
        ]
    )

    def slots(**params: Any) -> list[str]:
        result = client.simulate_get("/api/v1/jobs/backup/runs", params=params)
        assert result.status == falcon.HTTP_200
        return [r["slot"] for r in result.json["runs"]]

    assert slots(state="failed,unknown") == [
        format_slot(SLOT),
        format_slot(SLOT - timedelta(minutes=10)),
    ]
    assert slots(node="node-2") == [format_slot(SLOT - timedelta(minutes=5))]
    assert slots(since="2026-11-27T02:50:00Z", until="2026-11-27T02:55:00Z") == [
        format_slot(SLOT - timedelta(minutes=5))
    ]


@pytest.mark.parametrize(
    ("params", "name"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"state": "running,exploded"}, "state"),
        ({"since": "yesterday"}, "since"),
        ({"until": "2026-11-27T03:00:00"}, "until"),  # no time zone
        ({"cursor": "not-a-cursor"}, "cursor"),
    ],
)
def test_runs_rejects_bad_query_parameters_with_400(
    client: TestClient, coordination: SQLiteCoordinationStore, params: dict[str, str], name: str
) -> None:
    publish(coordination)
    result = client.simulate_get("/api/v1/jobs/backup/runs", params=params)
    error = assert_error(result, falcon.HTTP_400)
    assert name in error["title"] + error["description"]


def test_runs_of_a_job_never_seen_is_404(
    client: TestClient, coordination: SQLiteCoordinationStore
) -> None:
    publish(coordination)
    assert_error(client.simulate_get("/api/v1/jobs/ghost/runs"), falcon.HTTP_404)


def test_runs_of_a_removed_job_still_show_its_history(
    client: TestClient, coordination: SQLiteCoordinationStore, reports: SQLiteReportStore
) -> None:
    publish(coordination, jobs=())
    reports.write([report("retired", SLOT)])
    body = client.simulate_get("/api/v1/jobs/retired/runs").json
    assert [r["run_id"] for r in body["runs"]] == [run_id_for("retired", SLOT)]


# -- trigger ----------------------------------------------------------------------


def test_trigger_queues_a_manual_run_and_answers_202_with_its_status_url(
    client: TestClient, coordination: SQLiteCoordinationStore
) -> None:
    publish(coordination)
    result = client.simulate_post("/api/v1/jobs/backup/runs")
    run_id = run_id_for("backup", NOW)
    assert result.status == falcon.HTTP_202
    assert result.json == {
        "run_id": run_id,
        "job_id": "backup",
        "slot": format_slot(NOW),
        "status_url": f"/api/v1/runs/{run_id}",
    }
    assert result.headers["location"].endswith(f"/api/v1/runs/{run_id}")
    assert coordination.pending_triggers() == [
        TriggerRequest(
            run_id=run_id, job_id="backup", slot=NOW, requested_at=NOW, requested_by="anonymous"
        )
    ]
    # The status URL answers at once: the run is queued.
    status = client.simulate_get(result.json["status_url"]).json
    assert status == {
        "run_id": run_id,
        "job_id": "backup",
        "slot": format_slot(NOW),
        "state": "queued",
        "source": "triggers",
    }


def test_a_body_over_1_mib_is_413_and_one_of_unknown_length_411_before_it_is_read(
    client: TestClient, coordination: SQLiteCoordinationStore
) -> None:
    publish(coordination)
    big = b"{" + b" " * MAX_BODY_BYTES + b"}"
    refused = client.simulate_post(
        "/api/v1/jobs/backup/runs", body=big, headers={"Content-Type": "application/json"}
    )
    assert_error(refused, falcon.HTTP_413)
    chunked = client.simulate_post(
        "/api/v1/jobs/backup/runs",
        body=b"{}",
        headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
    )
    assert_error(chunked, falcon.HTTP_411)
    assert coordination.pending_triggers() == []  # neither was read, nor queued a run
    just_fits = b"{" + b" " * (MAX_BODY_BYTES - 2) + b"}"
    accepted = client.simulate_post(
        "/api/v1/jobs/backup/runs", body=just_fits, headers={"Content-Type": "application/json"}
    )
    assert accepted.status == falcon.HTTP_202


EDGE_INSTANTS = (
    "0001-01-01T00:00:00+01:00",  # before the calendar once in UTC
    "9999-12-31T23:59:59.999999-01:00",  # after it
    "9999-12-31T23:59:59.999999Z",  # its last instant
    "0001-01-01T00:00:00Z",  # its first
)
HUGE = 2**63
EDGE_REQUESTS = [
    *(
        ("GET", f"/api/v1/runs?{q}={t.replace('+', '%2B')}")
        for t in EDGE_INSTANTS
        for q in ("since", "until")
    ),
    *(("GET", f"/api/v1/runs/backup@{t.replace('+', '%2B')}") for t in EDGE_INSTANTS),
    *(("POST", f"/api/v1/runs/backup@{t.replace('+', '%2B')}/cancel") for t in EDGE_INSTANTS),
    ("GET", f"/api/v1/runs?cursor={base64.urlsafe_b64encode(f'{HUGE}|x'.encode()).decode()}"),
    ("GET", f"/api/v1/runs?cursor={base64.urlsafe_b64encode(f'-{HUGE + 1}|x'.encode()).decode()}"),
]


@pytest.mark.parametrize(("method", "target"), EDGE_REQUESTS)
def test_instants_at_the_calendars_edges_and_huge_cursors_are_never_a_500(
    client: TestClient, method: str, target: str
) -> None:
    path, _, query = target.partition("?")
    result = client.simulate_request(method, path, query_string=query)
    assert result.status_code in (200, 400, 404), (target, result.text)
    assert result.headers["content-type"].startswith("application/json")


def test_a_deeply_nested_body_is_400_not_a_500(
    client: TestClient, coordination: SQLiteCoordinationStore
) -> None:
    publish(coordination)
    body = b"[" * 100_000 + b"]" * 100_000
    result = client.simulate_post(
        "/api/v1/jobs/backup/runs", body=body, headers={"Content-Type": "application/json"}
    )
    assert "nested too deeply" in assert_error(result, falcon.HTTP_400)["description"]


# -- cancel -----------------------------------------------------------------------


def test_cancel_of_an_active_run_is_202_and_asks_its_peer_to_end_it(
    client: TestClient, leader: SQLiteCoordinationStore
) -> None:
    run_id = run_id_for("backup", NOW)
    leader.record_runs(
        epoch_of(leader),
        [RunRecord(run_id, "backup", NOW, "web-1", "peer-a", RunState.RUNNING)],
    )
    result = client.simulate_post(f"/api/v1/runs/{run_id}/cancel")
    assert result.status == falcon.HTTP_202
    assert result.json == {
        "run_id": run_id,
        "state": "running",
        "cancel_requested": True,
        "cancelled_by": "anonymous",
        "status_url": f"/api/v1/runs/{run_id}",
    }
    assert result.headers["location"].endswith(f"/api/v1/runs/{run_id}")
    record = leader.get_run(run_id)
    assert record is not None and record.cancel_requested and record.cancelled_by == "anonymous"
    again = client.simulate_post(f"/api/v1/runs/{run_id}/cancel")  # idempotent
    assert again.status == falcon.HTTP_202 and again.json["cancelled_by"] == "anonymous"


def test_cancel_of_an_ended_run_is_409_naming_its_state(
    client: TestClient, leader: SQLiteCoordinationStore, reports: SQLiteReportStore
) -> None:
    reported = run_id_for("backup", NOW - timedelta(hours=1))
    reports.write([RunReport(reported, "backup", NOW - timedelta(hours=1), RunState.SUCCEEDED)])
    recorded = run_id_for("backup", NOW)
    leader.record_runs(
        epoch_of(leader),
        [RunRecord(recorded, "backup", NOW, None, None, RunState.SKIPPED, ended_at=NOW)],
    )
    for run_id, state in ((reported, "succeeded"), (recorded, "skipped")):
        result = client.simulate_post(f"/api/v1/runs/{run_id}/cancel")
        assert_error(result, falcon.HTTP_409)
        assert state in result.json["error"]["description"]


def test_cancel_of_a_queued_run_is_409_and_of_an_unknown_one_404(
    client: TestClient, coordination: SQLiteCoordinationStore
) -> None:
    publish(coordination)
    queued = client.simulate_post("/api/v1/jobs/backup/runs").json["run_id"]
    result = client.simulate_post(f"/api/v1/runs/{queued}/cancel")
    assert_error(result, falcon.HTTP_409)
    assert "queued" in result.json["error"]["description"]
    unknown = run_id_for("backup", NOW - timedelta(days=3))
    assert_error(client.simulate_post(f"/api/v1/runs/{unknown}/cancel"), falcon.HTTP_404)
    assert_error(client.simulate_post("/api/v1/runs/not-a-run-id/cancel"), falcon.HTTP_400)


def test_trigger_accepts_an_empty_json_object_body(
    client: TestClient, coordination: SQLiteCoordinationStore
) -> None:
    publish(coordination)
    result = client.simulate_post("/api/v1/jobs/backup/runs", json={})
    assert result.status == falcon.HTTP_202


def test_trigger_of_a_disabled_job_is_accepted(
    client: TestClient, coordination: SQLiteCoordinationStore
) -> None:
    publish(coordination, enabled=False)
    assert client.simulate_post("/api/v1/jobs/backup/runs").status == falcon.HTTP_202
    assert len(coordination.pending_triggers()) == 1


def test_trigger_of_an_unknown_job_is_404_and_queues_nothing(
    client: TestClient, coordination: SQLiteCoordinationStore
) -> None:
    publish(coordination)
    assert_error(client.simulate_post("/api/v1/jobs/nope/runs"), falcon.HTTP_404)
    assert coordination.pending_triggers() == []


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]"])
def test_trigger_with_a_malformed_body_is_400(
    client: TestClient, coordination: SQLiteCoordinationStore, body: bytes
) -> None:
    publish(coordination)
    result = client.simulate_post(
        "/api/v1/jobs/backup/runs", body=body, headers={"Content-Type": "application/json"}
    )
    assert_error(result, falcon.HTTP_400)
    assert coordination.pending_triggers() == []


# -- one run ----------------------------------------------------------------------


def test_run_prefers_the_finished_report_with_its_output(
    client: TestClient, reports: SQLiteReportStore, leader: SQLiteCoordinationStore
) -> None:
    run_id = run_id_for("backup", SLOT)
    leader.record_runs(epoch_of(leader), [record("backup", SLOT)])
    reports.write([report("backup", SLOT, stdout="hello\n", stderr="warn\n")])
    body = client.simulate_get(f"/api/v1/runs/{run_id}").json
    assert body["source"] == "reports"
    assert body["run_id"] == run_id
    assert body["state"] == "succeeded"
    assert body["stdout"] == "hello\n"
    assert body["stderr"] == "warn\n"
    assert body["duration_ms"] == 2000


def test_run_that_is_still_active_comes_from_coordination_without_output(
    client: TestClient, leader: SQLiteCoordinationStore
) -> None:
    run_id = run_id_for("backup", SLOT)
    leader.record_runs(epoch_of(leader), [record("backup", SLOT)])
    body = client.simulate_get(f"/api/v1/runs/{run_id}").json
    assert body["source"] == "coordination"
    assert body["state"] == "assigned"
    assert body["stdout"] is None and body["stderr"] is None
    assert body["node_id"] == "node-1"


def test_run_id_may_be_percent_encoded(client: TestClient, reports: SQLiteReportStore) -> None:
    run_id = run_id_for("backup", SLOT)
    reports.write([report("backup", SLOT)])
    result = client.simulate_get(f"/api/v1/runs/{quote(run_id, safe='')}")
    assert result.status == falcon.HTTP_200
    assert result.json["run_id"] == run_id


def test_slot_run_on_several_nodes_answers_each_nodes_run(
    client: TestClient, reports: SQLiteReportStore, leader: SQLiteCoordinationStore
) -> None:
    base = run_id_for("fanout", SLOT)
    reports.write([report("fanout", SLOT, node_id="node-1", run_id=f"{base}~node-1")])
    leader.record_runs(
        epoch_of(leader),
        [
            record("fanout", SLOT, node_id="node-2", run_id=f"{base}~node-2"),
            # Not of this slot: must not be listed.
            record("fanout", NOW, node_id="node-2", run_id=f"{run_id_for('fanout', NOW)}~node-2"),
        ],
    )
    body = client.simulate_get(f"/api/v1/runs/{base}").json
    assert body["run_id"] == base
    assert body["source"] == "nodes"
    assert [(r["run_id"], r["source"]) for r in body["runs"]] == [
        (f"{base}~node-1", "reports"),
        (f"{base}~node-2", "coordination"),
    ]


def test_unknown_run_is_404(client: TestClient) -> None:
    assert_error(client.simulate_get(f"/api/v1/runs/{run_id_for('x', SLOT)}"), falcon.HTTP_404)


@pytest.mark.parametrize("run_id", ["no-at-sign", "backup@yesterday", "@2026-11-27T03:00:00Z"])
def test_malformed_run_id_is_400(client: TestClient, run_id: str) -> None:
    assert_error(client.simulate_get(f"/api/v1/runs/{run_id}"), falcon.HTTP_400)


# -- nodes and config errors ----------------------------------------------------------


def test_nodes_are_sorted_with_their_active_run_counts(
    client: TestClient,
    coordination: SQLiteCoordinationStore,
    leader: SQLiteCoordinationStore,
) -> None:
    publish(coordination, nodes=("web-2", "web-1"))
    leader.record_runs(
        epoch_of(leader),
        [
            record("a", SLOT, node_id="web-1"),
            record("b", SLOT, node_id="web-1"),
            record("c", SLOT, node_id="web-2"),
        ],
    )
    leader.finish_run(run_id_for("c", SLOT), RunState.SUCCEEDED, ended_at=NOW, exit_code=0)
    nodes = client.simulate_get("/api/v1/nodes").json["nodes"]
    assert [(n["id"], n["active_runs"]) for n in nodes] == [("web-1", 2), ("web-2", 0)]
    assert nodes[0]["connection_type"] == "local"


def test_config_errors_name_the_snapshot_they_come_from(
    client: TestClient, coordination: SQLiteCoordinationStore
) -> None:
    errors = ({"file": "jobs.d/bad.json", "field": "schedule", "reason": "required"},)
    publish(coordination, errors=errors)
    assert client.simulate_get("/api/v1/config/errors").json == {
        "peer_id": "peer-a",
        "errors": list(errors),
    }


def test_config_errors_without_any_snapshot(client: TestClient) -> None:
    assert client.simulate_get("/api/v1/config/errors").json == {"peer_id": None, "errors": []}


# -- errors -------------------------------------------------------------------------


def test_unknown_route_is_404_json(client: TestClient) -> None:
    error = assert_error(client.simulate_get("/api/v1/nothing-here"), falcon.HTTP_404)
    assert "/api/v1/nothing-here" in error["description"]


def test_wrong_method_is_405_json(client: TestClient) -> None:
    result = client.simulate_delete("/api/v1/jobs")
    assert_error(result, falcon.HTTP_405)
    assert "GET" in result.headers["allow"]


def test_unavailable_store_is_503_json(
    tmp_path: Path, reports: SQLiteReportStore, clock: FakeClock
) -> None:
    coordination = UnreachableCoordination(tmp_path / "coordination.sqlite3")
    try:
        result = TestClient(create_app(coordination, reports, "peer-a", clock)).simulate_get(
            "/api/v1/cluster"
        )
    finally:
        coordination.close()
    error = assert_error(result, falcon.HTTP_503)
    assert "session suspended" in error["description"]


def test_unexpected_error_is_500_json_and_logged(
    tmp_path: Path,
    reports: SQLiteReportStore,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    coordination = BuggyCoordination(tmp_path / "coordination.sqlite3")
    try:
        app = create_app(coordination, reports, "peer-a", clock)
        with caplog.at_level(logging.ERROR, logger="distcrond.api"):
            result = TestClient(app).simulate_get("/api/v1/cluster")
    finally:
        coordination.close()
    assert_error(result, falcon.HTTP_500)
    [entry] = [r for r in caplog.records if r.name.startswith("distcrond.api")]
    assert entry.exc_info is not None and entry.exc_info[0] is KeyError


# -- /api/v1/runs search, the report spool in health, /metrics ----------------------------


def test_runs_search_finds_output_words_across_jobs_with_filters(
    client: TestClient, reports: SQLiteReportStore
) -> None:
    disk = report("backup", SLOT, stdout="Disk full on /srv\n")
    net = report("sync", SLOT + timedelta(minutes=1), stderr="connection refused\n")
    both = report(
        "sync",
        SLOT + timedelta(minutes=2),
        state=RunState.FAILED,
        stdout="disk ok",
        stderr="connection reset",
    )
    reports.write([disk, net, both])

    def ids(**params: str) -> list[str]:
        result = client.simulate_get("/api/v1/runs", params=params)
        assert result.status == falcon.HTTP_200, result.text
        return [r["run_id"] for r in result.json["runs"]]

    assert ids() == [both.run_id, net.run_id, disk.run_id]
    assert ids(q="disk") == [both.run_id, disk.run_id]
    assert ids(q="disk connection") == [both.run_id]
    assert ids(q="connection", job="sync", state="failed") == [both.run_id]
    assert ids(q="nowhere") == []
    first = client.simulate_get("/api/v1/runs", params={"q": "connection", "limit": "1"}).json
    second = client.simulate_get(
        "/api/v1/runs", params={"q": "connection", "limit": "1", "cursor": first["next_cursor"]}
    ).json
    assert [r["run_id"] for r in first["runs"] + second["runs"]] == [both.run_id, net.run_id]
    assert second["next_cursor"] is None


def test_runs_search_rejects_bad_parameters_by_name(client: TestClient) -> None:
    for params, name in (({"state": "nope"}, "state"), ({"cursor": "!!"}, "cursor")):
        error = assert_error(client.simulate_get("/api/v1/runs", params=params), falcon.HTTP_400)
        assert name in error["description"] or name in error["title"]


def spool_with_waiting_reports(tmp_path: Path, clock: FakeClock) -> Path:
    """A spool directory holding two undelivered reports (its inner store is down)."""
    from distcrond.reporting.spool import SpooledReportStore

    class Down(SQLiteReportStore):
        def write(self, reports: Any) -> None:
            raise StoreUnavailable("elasticsearch: connection refused")

    directory = tmp_path / "report-spool"
    spool = SpooledReportStore(Down(tmp_path / "down.sqlite3"), directory, clock=clock)
    spool.write([report("backup", SLOT)])
    spool.write([report("backup", SLOT + timedelta(minutes=5))])
    spool.close()
    return directory


def test_health_shows_the_report_spool_when_reports_go_through_one(
    tmp_path: Path,
    coordination: SQLiteCoordinationStore,
    reports: SQLiteReportStore,
    clock: FakeClock,
) -> None:
    directory = spool_with_waiting_reports(tmp_path, clock)
    app = create_app(coordination, reports, "peer-a", clock, spool_dir=directory)

    body = TestClient(app).simulate_get("/api/v1/health").json

    assert body["report_spool"]["reports"] == 2
    assert body["report_spool"]["bytes"] > 0
    assert body["report_spool"]["dead_letters"] == 0
    assert "connection refused" in body["report_spool"]["last_error"]


def test_health_has_no_spool_without_one(client: TestClient) -> None:
    assert "report_spool" not in client.simulate_get("/api/v1/health").json


def test_metrics_are_prometheus_text_with_the_spool_gauges(
    tmp_path: Path,
    coordination: SQLiteCoordinationStore,
    reports: SQLiteReportStore,
    clock: FakeClock,
    leader: SQLiteCoordinationStore,
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    directory = spool_with_waiting_reports(tmp_path, clock)
    app = create_app(coordination, reports, "peer-a", clock, spool_dir=directory)

    result = TestClient(app).simulate_get("/metrics")

    assert result.status == falcon.HTTP_200
    assert result.headers["content-type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(result.text)
        for s in family.samples
    }
    assert samples[("distcron_report_spool_reports", ())] == 2
    assert samples[("distcron_report_spool_dead_letters", ())] == 0
    assert samples[("distcron_report_spool_bytes", ())] > 0
    assert samples[("distcron_is_leader", ())] == 1
    assert samples[("distcron_store_up", (("backend", "sqlite"), ("store", "reports")))] == 1
    assert samples[("distcron_active_runs", ())] == 0
    assert samples[("distcron_scheduler_stall_timeout_seconds", ())] == 5.0


def test_metrics_give_the_age_of_the_leaders_last_pass(
    client: TestClient, leader: SQLiteCoordinationStore, clock: FakeClock
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    passed(leader, NOW)
    clock.advance(timedelta(seconds=1.5))
    samples = {
        s.name: s.value
        for family in text_string_to_metric_families(client.simulate_get("/metrics").text)
        for s in family.samples
    }
    assert samples["distcron_scheduler_last_pass_age_seconds"] == 1.5


def test_metrics_without_a_spool_have_no_spool_gauges(client: TestClient) -> None:
    text = client.simulate_get("/metrics").text
    assert "distcron_store_up" in text and "distcron_report_spool" not in text
