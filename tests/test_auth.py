"""API tokens and roles: the tokens file, the table, and the API's middleware (TestClient)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from falcon.testing import TestClient

from distcrond.api import create_app
from distcrond.api.auth import TokenSource, required_role
from distcrond.api.resources import JobRuns, Live, RunCancel
from distcrond.clock import FakeClock
from distcrond.config.loader import ConfigRegistry
from distcrond.config.models import JobSpec
from distcrond.config.tokens import (
    Role,
    TokenTable,
    load_tokens,
    new_token,
    token_digest,
    write_table,
)
from distcrond.coordination.base import ConfigSnapshot
from distcrond.coordination.sqlite import SQLiteCoordinationStore
from distcrond.reporting.sqlite import SQLiteReportStore
from distcrond.runs import RunRecord, RunState, run_id_for

NOW = datetime(2026, 12, 7, 6, 0, tzinfo=UTC)
TOKENS = {"reader": new_token(), "ops": new_token(), "root": new_token()}
ROLES = {"reader": "read", "ops": "operate", "root": "admin"}


def tokens_json(**tokens: str) -> dict[str, Any]:
    return {
        "tokens": [
            {"name": name, "role": ROLES.get(name, "read"), "sha256": token_digest(token)}
            for name, token in tokens.items()
        ]
    }


def write(path: Path, data: Any) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


# -- the file ----------------------------------------------------------------------------------


def test_a_good_file_gives_the_table_and_each_token_finds_its_entry(tmp_path: Path) -> None:
    table = load_tokens(write(tmp_path / "tokens.json", tokens_json(**TOKENS)))
    assert isinstance(table, TokenTable)
    for name, token in TOKENS.items():
        entry = table.authenticate(token)
        assert entry is not None and entry.name == name and entry.role == ROLES[name]
    assert table.authenticate("not-a-token") is None
    assert table.authenticate(TOKENS["ops"][:-1]) is None


@pytest.mark.parametrize(
    ("data", "field", "reason"),
    [
        (
            {"tokens": [{"name": "a", "role": "boss", "sha256": "0" * 64}]},
            "tokens.0.role",
            "'read'",
        ),
        ({"tokens": [{"name": "a", "role": "read", "sha256": "ab"}]}, "tokens.0.sha256", "SHA-256"),
        ({"tokens": [{"name": "a b", "role": "read", "sha256": "0" * 64}]}, "tokens.0.name", ""),
        ({"tokens": [{"name": "a", "role": "read", "sha256": "0" * 64, "x": 1}]}, "tokens.0.x", ""),
        ({}, "tokens", "required"),
        (
            {
                "tokens": [
                    {"name": "a", "role": "read", "sha256": "0" * 64},
                    {"name": "a", "role": "admin", "sha256": "1" * 64},
                ]
            },
            "tokens",
            "more than once",
        ),
        ("[" * 10_000, "", "nested too deeply"),
        ("{not json", "", "invalid JSON"),
    ],
)
def test_a_bad_file_is_errors_naming_file_field_and_reason(
    tmp_path: Path, data: Any, field: str, reason: str
) -> None:
    path = write(tmp_path / "tokens.json", data)
    errors = load_tokens(path)
    assert isinstance(errors, list) and errors
    assert all(e.file == str(path) for e in errors)
    assert any(e.field == field and reason in e.reason for e in errors), errors


def test_a_bad_file_keeps_the_last_good_table_and_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "jobs").mkdir()
    (tmp_path / "nodes").mkdir()
    path = write(tmp_path / "tokens.json", tokens_json(ops=TOKENS["ops"]))
    registry = ConfigRegistry(tmp_path / "jobs", tmp_path / "nodes", path)
    good = registry.reload()
    assert good.tokens is not None and good.tokens.authenticate(TOKENS["ops"]) is not None
    assert good.errors == ()
    write(path, {"tokens": [{"name": "ops", "role": "root", "sha256": "0" * 64}]})
    bad = registry.reload()
    assert bad.tokens == good.tokens
    assert [(e.file, e.field) for e in bad.errors] == [(str(path), "tokens.0.role")]
    write(path, tokens_json(reader=TOKENS["reader"]))
    fixed = registry.reload()
    assert fixed.errors == () and fixed.tokens is not None
    assert fixed.tokens.authenticate(TOKENS["ops"]) is None
    assert fixed.tokens.authenticate(TOKENS["reader"]) is not None


def test_the_table_written_for_the_workers_is_private_and_reread_when_it_changes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "api-tokens.json"
    first = load_tokens(write(tmp_path / "a.json", tokens_json(ops=TOKENS["ops"])))
    assert isinstance(first, TokenTable)
    write_table(first, path)
    assert path.stat().st_mode & 0o777 == 0o600
    source = TokenSource(path)
    assert source.table() == first
    second = load_tokens(write(tmp_path / "b.json", tokens_json(reader=TOKENS["reader"])))
    assert isinstance(second, TokenTable)
    write_table(second, path)
    assert source.table() == second
    path.unlink()
    assert source.table() == TokenTable()  # no file: nobody gets in


def test_a_route_without_roles_reads_with_read_and_changes_with_admin() -> None:
    assert required_role(object(), "GET") is Role.READ
    assert required_role(object(), "DELETE") is Role.ADMIN
    assert required_role(object(), "POST") is Role.ADMIN
    assert required_role(JobRuns, "POST") is Role.OPERATE
    assert required_role(RunCancel, "POST") is Role.OPERATE
    assert required_role(Live, "GET") is None


# -- the API -----------------------------------------------------------------------------------


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[tuple[SQLiteCoordinationStore, SQLiteReportStore]]:
    coordination = SQLiteCoordinationStore(tmp_path / "coordination.sqlite3")
    reports = SQLiteReportStore(tmp_path / "reports.sqlite3")
    spec = JobSpec.model_validate(
        {"id": "backup", "schedule": {"cron": "0 3 * * *"}, "command": ["/bin/true"]}
    )
    coordination.publish_config(
        ConfigSnapshot(
            peer_id="peer-a",
            digest="d",
            jobs={"backup": spec.model_dump(mode="json")},
            nodes={},
            errors=[],
            loaded_at=NOW,
        )
    )
    yield coordination, reports
    coordination.close()
    reports.close()


@pytest.fixture
def client(tmp_path: Path, stores: tuple[SQLiteCoordinationStore, SQLiteReportStore]) -> TestClient:
    table = load_tokens(write(tmp_path / "tokens.json", tokens_json(**TOKENS)))
    assert isinstance(table, TokenTable)
    write_table(table, tmp_path / "api-tokens.json")
    source = TokenSource(tmp_path / "api-tokens.json")
    return TestClient(create_app(*stores, "peer-a", FakeClock(NOW), tokens=source))


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name]}"}


def test_without_a_token_every_route_but_liveness_is_401(client: TestClient) -> None:
    for path in ("/api/v1/jobs", "/api/v1/health", "/metrics", "/api/v1/openapi.json"):
        result = client.simulate_get(path)
        assert result.status_code == 401, path
        assert result.headers["WWW-Authenticate"].startswith("Bearer")
        assert result.json["error"]["title"] == "Unauthorized"
    assert client.simulate_post("/api/v1/jobs/backup/runs").status_code == 401
    live = client.simulate_get("/api/v1/health/live")
    assert live.status_code == 200 and live.json == {"status": "ok", "peer_id": "peer-a"}


def test_an_unknown_or_malformed_token_is_401(client: TestClient) -> None:
    for header in ("Bearer nope", "Basic " + TOKENS["root"], "Bearer", TOKENS["root"]):
        result = client.simulate_get("/api/v1/jobs", headers={"Authorization": header})
        assert result.status_code == 401, header


def test_read_reads_operate_triggers_and_a_role_too_low_is_403(client: TestClient) -> None:
    assert client.simulate_get("/api/v1/jobs", headers=bearer("reader")).status_code == 200
    refused = client.simulate_post("/api/v1/jobs/backup/runs", headers=bearer("reader"))
    assert refused.status_code == 403
    assert "operate" in refused.json["error"]["description"]
    for name in ("ops", "root"):
        accepted = client.simulate_post("/api/v1/jobs/backup/runs", headers=bearer(name))
        assert accepted.status_code == 202, name


def test_a_jobs_env_values_are_shown_to_admin_only(
    client: TestClient,
    stores: tuple[SQLiteCoordinationStore, SQLiteReportStore],
) -> None:
    coordination, reports = stores
    spec = JobSpec.model_validate(
        {
            "id": "deploy",
            "schedule": {"cron": "0 3 * * *"},
            "command": ["/bin/true"],
            "env": {"API_KEY": "s3cr3t", "REGION": "eu"},
        }
    )
    coordination.publish_config(
        ConfigSnapshot("peer-a", "d2", {"deploy": spec.model_dump(mode="json")}, {}, [], NOW)
    )
    for name in ("reader", "ops"):
        job = client.simulate_get("/api/v1/jobs/deploy", headers=bearer(name)).json["job"]
        assert job["env"] == {"API_KEY": "<hidden>", "REGION": "<hidden>"}, name
    shown = client.simulate_get("/api/v1/jobs/deploy", headers=bearer("root")).json["job"]
    assert shown["env"] == {"API_KEY": "s3cr3t", "REGION": "eu"}
    # Without tokens nobody has a role: the values stay hidden there too.
    open_api = TestClient(create_app(coordination, reports, "peer-a", FakeClock(NOW)))
    assert open_api.simulate_get("/api/v1/jobs/deploy").json["job"]["env"]["API_KEY"] == "<hidden>"


def test_cancel_needs_operate_and_records_the_token_that_asked(
    client: TestClient, stores: tuple[SQLiteCoordinationStore, SQLiteReportStore]
) -> None:
    coordination, _ = stores
    listener = threading.Event()

    class Elected:
        def establish_leadership(self, epoch: int) -> None:
            listener.set()

        def revoke_leadership(self) -> None:
            pass

    coordination.start_election("peer-a", Elected())
    assert listener.wait(5)
    leader = coordination.leader()
    assert leader is not None
    run_id = run_id_for("backup", NOW)
    coordination.record_runs(
        leader.epoch, [RunRecord(run_id, "backup", NOW, "n1", "peer-a", RunState.RUNNING)]
    )
    path = f"/api/v1/runs/{run_id}/cancel"
    assert client.simulate_post(path).status_code == 401
    assert client.simulate_post(path, headers=bearer("reader")).status_code == 403
    assert client.simulate_post(path, headers=bearer("ops")).status_code == 202
    record = coordination.get_run(run_id)
    assert record is not None and record.cancelled_by == "ops"
    # A trigger records its token too: the leader copies it onto the run's records.
    client.simulate_post("/api/v1/jobs/backup/runs", headers=bearer("root"))
    assert [t.requested_by for t in coordination.pending_triggers()] == ["root"]


def test_every_change_and_every_refused_change_is_one_audit_line(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="distcrond.audit")
    client.simulate_get("/api/v1/jobs", headers=bearer("reader"))  # a read: not audited
    client.simulate_post("/api/v1/jobs/backup/runs", headers=bearer("reader"))
    client.simulate_post("/api/v1/jobs/backup/runs", headers=bearer("ops"))
    client.simulate_post("/api/v1/jobs/backup/runs")
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "distcrond.audit"]
    assert [(line["token"], line["status"]) for line in lines] == [
        ("reader", 403),
        ("ops", 202),
        (None, 401),
    ]
    for line in lines:
        assert line["peer"] == "peer-a"
        assert line["method"] == "POST" and line["path"] == "/api/v1/jobs/backup/runs"
        assert line["client"] and line["time"]
    assert not any(TOKENS["ops"] in r.getMessage() for r in caplog.records)


def test_without_tokens_the_api_is_open(
    stores: tuple[SQLiteCoordinationStore, SQLiteReportStore],
) -> None:
    client = TestClient(create_app(*stores, "peer-a", FakeClock(NOW)))
    assert client.simulate_get("/api/v1/jobs").status_code == 200
    assert client.simulate_post("/api/v1/jobs/backup/runs").status_code == 202
