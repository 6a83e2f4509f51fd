"""distcronctl against the real API over real SQLite stores, through falcon's TestClient."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from falcon.testing import TestClient

from distcrond.api import create_app
from distcrond.clock import FakeClock
from distcrond.config.models import JobSpec, NodeSpec
from distcrond.coordination.base import ConfigSnapshot, PeerInfo, StoreStatus
from distcrond.coordination.sqlite import SQLiteCoordinationStore
from distcrond.ctl import Transport, Unreachable, main, render_health, table
from distcrond.reporting.sqlite import SQLiteReportStore
from distcrond.runs import RunRecord, RunReport, RunState, run_id_for

NOW = datetime(2026, 11, 27, 3, 0, tzinfo=UTC)
SLOT = datetime(2026, 11, 27, 2, 55, tzinfo=UTC)
URL = "http://peer-a.test:8080"


class Listener:
    def __init__(self) -> None:
        self.established = threading.Event()

    def establish_leadership(self, epoch: int) -> None:
        self.established.set()

    def revoke_leadership(self) -> None:
        pass


class Cluster:
    """Real stores with one job, one node and a little history; peer-a leads."""

    def __init__(self, tmp_path: Path) -> None:
        self.coordination = SQLiteCoordinationStore(tmp_path / "coordination.sqlite3")
        self.reports = SQLiteReportStore(tmp_path / "reports.sqlite3")
        listener = Listener()
        self.coordination.start_election("peer-a", listener)
        assert listener.established.wait(5)
        leader = self.coordination.leader()
        assert leader is not None
        self.epoch = leader.epoch
        self.requests: list[tuple[str, str, bytes | None]] = []

    def close(self) -> None:
        self.coordination.close()
        self.reports.close()

    def transport(self, reports: SQLiteReportStore | None = None) -> Transport:
        client = TestClient(
            create_app(self.coordination, reports or self.reports, "peer-a", FakeClock(NOW))
        )

        def send(method: str, url: str, body: bytes | None) -> tuple[int, Any]:
            self.requests.append((method, url, body))
            parts = urlsplit(url)
            result = client.simulate_request(
                method,
                parts.path,
                query_string=parts.query,
                body=body,
                headers={"Content-Type": "application/json"} if body is not None else None,
            )
            return result.status_code, json.loads(result.text) if result.text else None

        return send


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    backup = JobSpec.model_validate(
        {
            "id": "backup",
            "description": "nightly backup",
            "schedule": {"cron": "*/5 * * * *"},
            "command": ["/usr/bin/backup", "--all"],
        }
    )
    c.coordination.publish_config(
        ConfigSnapshot(
            peer_id="peer-a",
            digest="d1",
            jobs={"backup": backup.model_dump(mode="json")},
            nodes={"web-1": NodeSpec(id="web-1").model_dump(mode="json")},
            errors=[
                {"file": "jobs.d/broken.json", "field": "schedule", "reason": "Field required"}
            ],
        )
    )
    c.reports.write(
        [
            RunReport(
                run_id=run_id_for("backup", SLOT - timedelta(minutes=5 * i)),
                job_id="backup",
                slot=SLOT - timedelta(minutes=5 * i),
                state=RunState.FAILED if i == 0 else RunState.SUCCEEDED,
                node_id="web-1",
                peer_id="peer-a",
                started_at=SLOT - timedelta(minutes=5 * i),
                ended_at=SLOT - timedelta(minutes=5 * i) + timedelta(seconds=3),
                exit_code=2 if i == 0 else 0,
                stdout="copied 3 files\n",
                stderr="disk almost full\n",
            )
            for i in range(3)
        ]
    )
    c.coordination.record_runs(
        c.epoch,
        [
            RunRecord(
                run_id=run_id_for("backup", NOW),
                job_id="backup",
                slot=NOW,
                node_id="web-1",
                peer_id="peer-a",
                state=RunState.ASSIGNED,
            )
        ],
    )
    yield c
    c.close()


def run(cluster: Cluster, *argv: str, transport: Transport | None = None) -> int:
    return main(["--url", URL, *argv], transport=transport or cluster.transport())


def test_table_aligns_columns() -> None:
    assert table(("A", "LONGER"), [["xxxx", "y"], ["z", "w"]]).splitlines() == [
        "A     LONGER",
        "xxxx  y",
        "z     w",
    ]


def test_jobs_prints_an_aligned_table(cluster: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(cluster, "jobs") == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == [
        "ID",
        "ENABLED",
        "SCHEDULE",
        "NEXT",
        "SLOT",
        "LAST",
        "LAST",
        "SLOT",
        "EXIT",
    ]
    assert row.startswith("backup")
    for cell in (
        "yes",
        "cron */5 * * * *",
        "2026-11-27 03:05:00Z",
        "failed",
        "2026-11-27 02:55:00Z",
    ):
        assert cell in row
    assert header.index("NEXT SLOT") == row.index("2026-11-27 03:05:00Z")


def test_json_flag_prints_the_api_answer_before_or_after_the_command(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(cluster, "--json", "jobs") == 0
    before = json.loads(capsys.readouterr().out)
    assert run(cluster, "jobs", "--json") == 0
    after = json.loads(capsys.readouterr().out)
    assert before == after
    assert [j["id"] for j in before["jobs"]] == ["backup"]


def test_job_shows_the_definition_and_active_runs(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(cluster, "job", "backup") == 0
    out = capsys.readouterr().out
    assert "description: nightly backup" in out
    assert "/usr/bin/backup --all" in out
    assert "active runs:" in out
    assert run_id_for("backup", NOW) in out


def test_runs_lists_active_then_finished_and_offers_the_next_page(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(cluster, "runs", "backup", "--limit", "2") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["SLOT", "STATE", "NODE"]
    assert "assigned" in lines[1]
    assert "failed" in lines[2] and "3.0s" in lines[2]
    assert "succeeded" in lines[3]
    assert lines[4].startswith("more: distcronctl runs backup --cursor ")
    cursor = lines[4].split()[-1]

    assert run(cluster, "runs", "backup", "--limit", "2", "--cursor", cursor) == 0
    rest = capsys.readouterr().out.splitlines()
    assert len(rest) == 2  # header and the oldest run
    assert "more:" not in rest[-1]


def test_runs_passes_limit_and_state_to_the_api(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(cluster, "--json", "runs", "backup", "--state", "failed", "--limit", "5") == 0
    body = json.loads(capsys.readouterr().out)
    assert [r["state"] for r in body["runs"]] == ["failed"]
    assert body["active"] == []
    _, url, _ = cluster.requests[-1]
    assert "limit=5" in url and "state=failed" in url


def test_run_shows_the_output(cluster: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(cluster, "run", run_id_for("backup", SLOT)) == 0
    out = capsys.readouterr().out
    assert "state:" in out and "failed" in out
    assert "exit code: 2" in out
    assert "--- stdout ---\ncopied 3 files" in out
    assert "--- stderr ---\ndisk almost full" in out


def test_trigger_prints_the_run_id_and_run_shows_it_queued(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(cluster, "trigger", "backup") == 0
    run_id = capsys.readouterr().out.strip()
    assert run_id == run_id_for("backup", NOW)
    assert [t.run_id for t in cluster.coordination.pending_triggers()] == [run_id]
    # NOW's scheduled run exists too (assigned); the coordination record is found first.
    assert run(cluster, "--json", "run", run_id) == 0
    assert json.loads(capsys.readouterr().out)["source"] == "coordination"


def test_cancel_asks_for_the_run_to_end_and_refuses_one_that_has_ended(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    active = run_id_for("backup", NOW)  # assigned by the fixture
    assert run(cluster, "cancel", active) == 0
    assert capsys.readouterr().out.strip() == f"{active}: being cancelled (by anonymous)"
    record = cluster.coordination.get_run(active)
    assert record is not None and record.cancel_requested and record.cancelled_by == "anonymous"
    assert cluster.requests[-1] == ("POST", f"{URL}/api/v1/runs/{active}/cancel", b"{}")

    assert run(cluster, "cancel", run_id_for("backup", SLOT)) == 1  # reported: it has ended
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Run has ended (409)" in err and "failed" in err


def test_cluster_shows_the_leader_and_drifting_peers(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    for peer_id, digest in (("peer-a", "d1"), ("peer-b", "d2")):
        cluster.coordination.register_peer(
            PeerInfo(peer_id, f"http://{peer_id}:8080", NOW, "0.1.0", config_digest=digest)
        )
    assert run(cluster, "cluster") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"leader: peer-a (epoch {cluster.epoch}")
    assert out[1].split() == ["PEER", "LEADER", "VERSION", "API", "STARTED", "CONFIG"]
    assert out[2].split()[:2] == ["peer-a", "yes"] and out[2].endswith("ok")
    assert out[3].split()[:2] == ["peer-b", "no"] and out[3].endswith("DRIFT")
    assert out[4] == "config differs from the leader's on: peer-b"


def test_errors_lists_the_broken_files(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(cluster, "errors") == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["FILE", "FIELD", "REASON"]
    assert row.split(maxsplit=2) == ["jobs.d/broken.json", "schedule", "Field required"]


def test_api_error_exits_1_with_its_title_and_description(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(cluster, "job", "nope") == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "Unknown job (404)" in captured.err
    assert "'nope'" in captured.err


def test_unreachable_api_exits_1_naming_the_url(capsys: pytest.CaptureFixture[str]) -> None:
    def refused(method: str, url: str, body: bytes | None) -> tuple[int, Any]:
        raise Unreachable("[Errno 111] Connection refused")

    assert main(["--url", "http://10.0.0.9:8080", "jobs"], transport=refused) == 1
    err = capsys.readouterr().err
    assert "cannot reach the distcrond API at http://10.0.0.9:8080" in err
    assert "Connection refused" in err


def test_url_defaults_to_the_environment(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DISTCRON_URL", "http://from-env:9000/")
    assert main(["jobs"], transport=cluster.transport()) == 0
    assert cluster.requests[-1][1] == "http://from-env:9000/api/v1/jobs"


@pytest.mark.parametrize(
    "argv",
    [[], ["runs"], ["runs", "backup", "--limit", "0"], ["explode"], ["--timeout", "x", "jobs"]],
)
def test_usage_errors_exit_2(
    cluster: Cluster, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv, transport=cluster.transport()) == 2
    assert "usage:" in capsys.readouterr().err
    assert cluster.requests == []


def test_health_of_a_degraded_peer_is_shown_and_exits_1(
    cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    class FailingReports(SQLiteReportStore):
        def status(self) -> StoreStatus:
            return StoreStatus(ok=False, backend="sqlite", detail="disk on fire")

    failing = FailingReports(tmp_path / "reports.sqlite3")
    try:
        assert run(cluster, "health", transport=cluster.transport(failing)) == 1
    finally:
        failing.close()
    out = capsys.readouterr().out
    assert "status:" in out and "degraded" in out
    assert "reports:      sqlite FAILING disk on fire" in out


def test_search_finds_runs_by_the_words_of_their_output(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(cluster, "search", "disk", "full", "--state", "failed") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["SLOT", "STATE", "NODE"]
    assert len(lines) == 2 and "failed" in lines[1]
    _, url, _ = cluster.requests[-1]
    assert "/api/v1/runs?" in url and "q=disk+full" in url and "state=failed" in url

    assert run(cluster, "search", "nowhere") == 0
    assert capsys.readouterr().out.strip() == "no runs found"


def test_search_offers_the_next_page(cluster: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(cluster, "search", "copied", "--job", "backup", "--limit", "2") == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[3].startswith("more: add --cursor ")
    cursor = lines[3].split()[-1]
    assert run(cluster, "search", "copied", "--job", "backup", "--cursor", cursor) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_health_shows_the_report_spool_when_the_peer_has_one() -> None:
    body = {
        "status": "degraded",
        "peer_id": "peer-a",
        "stores": {
            "coordination": {"ok": True, "backend": "zookeeper"},
            "reports": {"ok": False, "backend": "elasticsearch", "detail": "refused"},
        },
        "report_spool": {
            "reports": 42,
            "bytes": 9000,
            "oldest_age_s": 31.4,
            "dead_letters": 0,
            "last_error": "connection refused",
        },
    }
    shown = render_health(body)
    assert "42 waiting, oldest 31s, 0 dead letters; last error: connection refused" in shown
    assert "report spool" not in render_health({**body, "report_spool": None})


def test_health_says_whether_the_cluster_schedules() -> None:
    body = {
        "status": "degraded",
        "stores": {},
        "scheduler": {"ok": False, "detail": "7.5 s since the last pass of epoch 3: over"},
    }
    assert "scheduler:    STALLED: 7.5 s since the last pass of epoch 3: over" in render_health(
        body
    )
    body["scheduler"] = {"ok": True, "detail": "0.4 s since the last pass of epoch 3"}
    assert "scheduler:    ok: 0.4 s since the last pass of epoch 3" in render_health(body)


def test_token_new_prints_a_token_and_the_entry_that_admits_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from distcrond.config.tokens import Role, TokensFile, TokenTable

    assert main(["token", "new", "ops", "--role", "operate", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    table = TokenTable(TokensFile.model_validate({"tokens": [data["entry"]]}).tokens)
    entry = table.authenticate(data["token"])
    assert entry is not None and entry.name == "ops" and entry.level is Role.OPERATE
    assert main(["token", "new", "ops", "--role", "operate"]) == 0
    text = capsys.readouterr().out
    assert "shown this once" in text and '"role": "operate"' in text
    assert main(["token", "new", "ops", "--role", "boss"]) == 2
    assert main(["token", "new", "two words", "--role", "read"]) == 2


def test_the_token_comes_from_a_file_the_flag_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distcrond.ctl import build_parser, read_token

    def token(*argv: str) -> str | None:
        return read_token(build_parser().parse_args([*argv, "jobs"]))

    assert token() is None
    monkeypatch.setenv("DISTCRON_TOKEN", "from-env")
    assert token() == "from-env"
    assert token("--token", "from-flag") == "from-flag"
    (tmp_path / "t").write_text("from-file\n")
    assert token("--token-file", str(tmp_path / "t")) == "from-file"


def test_a_refused_token_is_one_line_and_exit_status_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def refuse(method: str, url: str, body: bytes | None) -> tuple[int, Any]:
        error = {"title": "Unauthorized", "description": "This peer needs an API token."}
        return 401, {"error": error}

    assert main(["--url", URL, "jobs"], transport=refuse) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Unauthorized (401)" in err and "--token-file" in err


def test_a_ca_cert_that_cannot_be_loaded_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "missing.pem"
    assert main(["--url", "https://127.0.0.1:1", "--ca-cert", str(missing), "jobs"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--ca-cert {missing}: cannot load it" in err[0]
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    monkeypatch.setenv("DISTCRON_CA_CERT", str(garbage))
    assert main(["--url", "https://127.0.0.1:1", "jobs"]) == 1
    assert "cannot load it" in capsys.readouterr().err
