"""API tokens against the real daemon under gunicorn: status codes, reload, safe defaults,
the audit trail, and distcronctl's token."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests

from distcrond.config.tokens import new_token, token_digest
from integration.peers import DISTCRONCTL, DISTCROND, Peer, free_port, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

TOKENS = {"reader": new_token(), "ops": new_token()}
ROLES = {"reader": "read", "ops": "operate", "late": "read"}


def write_tokens(path: Path, **tokens: str) -> None:
    entries = [
        {"name": name, "role": ROLES[name], "sha256": token_digest(token)}
        for name, token in tokens.items()
    ]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"tokens": entries}))
    tmp.rename(path)


@pytest.fixture
def secured(make_peer, tmp_path: Path) -> Peer:  # type: ignore[no-untyped-def]
    tokens = tmp_path / "etc" / "api-tokens.json"
    tokens.parent.mkdir()
    write_tokens(tokens, **TOKENS)
    peer: Peer = make_peer(extra_args=["--api-tokens", str(tokens)])
    peer.write_node("local", {"connection_type": "local"})
    peer.write_job("hello", {"schedule": {"interval": "1h"}, "command": ["/bin/echo", "hello"]})
    peer.token = TOKENS["reader"]
    return peer.start()


def call(peer: Peer, method: str, path: str, token: str | None = None) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.request(method, f"{peer.url}{path}", headers=headers, timeout=5)


def test_each_role_gets_what_it_may_and_the_rest_is_401_or_403(secured: Peer) -> None:
    live = call(secured, "GET", "/api/v1/health/live")
    assert live.status_code == 200 and live.json()["status"] == "ok"
    for path in ("/api/v1/jobs", "/api/v1/health", "/api/v1/runs", "/metrics"):
        refused = call(secured, "GET", path)
        assert refused.status_code == 401, path
        assert refused.headers["Content-Type"].startswith("application/json")
        assert refused.json()["error"]["title"] == "Unauthorized"
        assert call(secured, "GET", path, "wrong-token").status_code == 401
        assert call(secured, "GET", path, TOKENS["reader"]).status_code == 200, path
    trigger = "/api/v1/jobs/hello/runs"
    assert call(secured, "POST", trigger).status_code == 401
    forbidden = call(secured, "POST", trigger, TOKENS["reader"])
    assert forbidden.status_code == 403 and "operate" in forbidden.json()["error"]["description"]
    accepted = call(secured, "POST", trigger, TOKENS["ops"])
    assert accepted.status_code == 202
    secured.wait_run(accepted.json()["run_id"], ("succeeded",))


def test_the_audit_trail_has_one_line_per_change_with_the_token_name(secured: Peer) -> None:
    call(secured, "POST", "/api/v1/jobs/hello/runs", TOKENS["reader"])
    call(secured, "POST", "/api/v1/jobs/hello/runs", TOKENS["ops"])

    def audit() -> list[dict[str, Any]] | None:
        lines = [
            json.loads(line[line.index("{") :])
            for line in secured.log().splitlines()
            if "distcrond.audit" in line and "{" in line
        ]
        return lines if len(lines) >= 2 else None

    lines = wait_for(audit, 10, "two audit lines in the peer's log")
    assert [(a["token"], a["status"], a["method"]) for a in lines] == [
        ("reader", 403, "POST"),
        ("ops", 202, "POST"),
    ]
    assert all(a["path"] == "/api/v1/jobs/hello/runs" and a["peer"] == "peer-a" for a in lines)
    assert TOKENS["ops"] not in secured.log() and TOKENS["reader"] not in secured.log()


def test_a_changed_tokens_file_is_in_force_within_a_second_and_a_bad_one_keeps_the_last(
    secured: Peer, tmp_path: Path
) -> None:
    path = tmp_path / "etc" / "api-tokens.json"
    late = new_token()
    write_tokens(path, ops=TOKENS["ops"], late=late)  # reader removed, late added
    wait_for(
        lambda: call(secured, "GET", "/api/v1/jobs", late).status_code == 200,
        1.0,
        "the new token to be accepted",
    )
    assert call(secured, "GET", "/api/v1/jobs", TOKENS["reader"]).status_code == 401

    path.write_text('{"tokens": [{"name": "x", "role": "superuser", "sha256": "00"}]}')

    def reported() -> list[dict[str, Any]] | None:
        errors = call(secured, "GET", "/api/v1/config/errors", late).json()["errors"]
        return [e for e in errors if e["file"] == str(path)] or None

    errors = wait_for(reported, 5, "the bad tokens file to be reported")
    assert {e["field"] for e in errors} == {"tokens.0.role", "tokens.0.sha256"}
    assert call(secured, "GET", "/api/v1/jobs", late).status_code == 200  # the last good
    assert call(secured, "POST", "/api/v1/jobs/hello/runs", TOKENS["ops"]).status_code == 202


def test_distcronctl_sends_its_token_and_a_refusal_is_one_line(
    secured: Peer, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKENS["ops"] + "\n")

    def ctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [DISTCRONCTL, "--url", secured.url, *args],
            capture_output=True,
            text=True,
            timeout=20,
            env={"PATH": "/usr/bin:/bin", **(env or {})},
        )

    refused = ctl("jobs")
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.count("\n") == 1 and "Unauthorized (401)" in refused.stderr
    listed = ctl("--token-file", str(token_file), "jobs")
    assert listed.returncode == 0 and "hello" in listed.stdout
    assert ctl("jobs", env={"DISTCRON_TOKEN": TOKENS["reader"]}).returncode == 0
    forbidden = ctl("trigger", "hello", env={"DISTCRON_TOKEN": TOKENS["reader"]})
    assert forbidden.returncode == 1 and "Forbidden (403)" in forbidden.stderr
    assert ctl("--token-file", str(token_file), "trigger", "hello").returncode == 0


def test_a_non_loopback_bind_without_tokens_refuses_to_start(tmp_path: Path) -> None:
    port = free_port()
    argv = [DISTCROND, "--state-dir", str(tmp_path / "state"), "--bind", f"0.0.0.0:{port}"]
    argv += ["--jobs-dir", str(tmp_path), "--nodes-dir", str(tmp_path)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "--api-tokens" in done.stderr and f"0.0.0.0:{port}" in done.stderr


def test_a_bad_tokens_file_at_start_stops_the_peer_naming_file_and_field(
    make_peer, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    tokens = tmp_path / "bad-tokens.json"
    tokens.write_text('{"tokens": [{"name": "ops", "role": "operate"}]}')
    peer: Peer = make_peer(extra_args=["--api-tokens", str(tokens)])
    peer.start(wait=False)
    assert peer.proc is not None and peer.proc.wait(30) == 2
    assert str(tokens) in peer.log() and "tokens.0.sha256" in peer.log()


def processes_running(command: str) -> list[int]:
    """Pids of this machine's processes whose command line is ``command`` (and the
    shell's, whose command line holds it: ``sh -c "... command ..."``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue  # gone meanwhile
            if command in cmdline:
                found.append(int(entry.name))
    return found


def test_a_cancel_ends_a_running_runs_whole_process_group_and_names_who_asked(
    secured: Peer,
) -> None:
    marker = f"{500 + uuid.uuid4().int % 1000}.{uuid.uuid4().int % 1000}"
    secured.write_job(
        "stuck",
        {
            "schedule": {"interval": "24h"},
            "shell": True,
            "command": f"sleep {marker} & sleep {marker}; echo never",
        },
    )
    wait_for(lambda: call(secured, "GET", "/api/v1/jobs/stuck", TOKENS["reader"]).ok, 5, "job")
    run_id = call(secured, "POST", "/api/v1/jobs/stuck/runs", TOKENS["ops"]).json()["run_id"]
    # The shell, and its two sleeps: the one it waits for and the one in the background.
    wait_for(lambda: len(processes_running(f"sleep {marker}")) == 3, 15, "the shell and sleeps")
    cancel = f"/api/v1/runs/{run_id}/cancel"

    assert call(secured, "POST", cancel, TOKENS["reader"]).status_code == 403
    accepted = call(secured, "POST", cancel, TOKENS["ops"])
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["cancelled_by"] == "ops"

    run = secured.wait_run(run_id, ("failed",), timeout=15)
    assert run["reason"] == "cancelled by ops"
    assert (run["triggered_by"], run["cancelled_by"]) == ("ops", "ops")
    assert "never" not in run["stdout"]
    wait_for(lambda: processes_running(f"sleep {marker}") == [], 10, "the group to be gone")
    again = call(secured, "POST", cancel, TOKENS["ops"])
    assert again.status_code == 409 and "failed" in again.json()["error"]["description"]
    audited = [
        json.loads(line[line.index("{") :])
        for line in secured.log().splitlines()
        if "distcrond.audit" in line and cancel in line
    ]
    assert [(a["token"], a["status"]) for a in audited] == [
        ("reader", 403),
        ("ops", 202),
        ("ops", 409),
    ]
