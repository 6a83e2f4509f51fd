"""The SSH runner against real OpenSSH servers on 127.0.0.2-4 (integration/ssh_fixtures.py).

First the runner alone (quoting, environment, exit codes, host keys, timeouts that
kill the remote process group, bounded output, pooled connections), then real
`distcrond` peers placing jobs over SSH nodes, standalone and in a cluster.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from deploy.services.sshd import SSHHost, SSHServers
from distcrond.config.models import NodeSpec
from distcrond.execution.base import RunOutcome, RunRequest
from distcrond.execution.ssh import SSHRunner
from integration.cluster import Cluster, duplicates
from integration.peers import Peer, ledger_lines, wait_for
from integration.ssh_fixtures import remote_processes, wait_remote_gone

pytestmark = pytest.mark.timeout(120)

NASTY = ["it's", 'say "hi"', "a; touch /tmp/distcron-pwned", "$(id)", "`id`", "two\nlines", "", "*"]


def node(host: SSHHost, node_id: str = "n1", **options: Any) -> NodeSpec:
    return NodeSpec.model_validate({"id": node_id, **host.node_file(**options)})


def request(spec: NodeSpec, *argv: str, **fields: Any) -> RunRequest:
    base: dict[str, Any] = {
        "run_id": f"job@{uuid.uuid4().hex}",
        "job_id": "job",
        "node_id": spec.id,
        "peer_id": "p1",
        "slot": datetime.now(UTC),
        "argv": argv,
        "env": {"DISTCRON_RUN_ID": "job@x"},
        "node": spec,
    }
    base.update(fields)
    return RunRequest(**base)


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[SSHRunner]:
    r = SSHRunner(learned_hosts=tmp_path / "learned_hosts", kill_grace=1.0)
    yield r
    r.close()


# -- the runner ------------------------------------------------------------------------------


def test_arguments_and_environment_reach_the_remote_command_unchanged(
    runner: SSHRunner, ssh_hosts: list[SSHHost]
) -> None:
    host = ssh_hosts[0]
    script = "import json, os, sys; print(json.dumps([sys.argv[1:], dict(os.environ)]))"
    env = {"DISTCRON_RUN_ID": "job@2026", "TRICKY": "it's $(x) `y`\nz"}
    outcome = runner.run(request(node(host), sys.executable, "-c", script, *NASTY, env=env))

    assert outcome.ok, outcome
    args, remote_env = json.loads(outcome.stdout)
    assert args == NASTY
    assert remote_env["TRICKY"] == env["TRICKY"] and remote_env["DISTCRON_RUN_ID"] == "job@2026"
    assert remote_env["SSH_CONNECTION"].split()[2] == host.address  # it ran on that host
    assert not Path("/tmp/distcron-pwned").exists()


def test_exit_code_stdout_and_stderr_are_those_of_the_command(
    runner: SSHRunner, ssh_hosts: list[SSHHost], tmp_path: Path
) -> None:
    outcome = runner.run(
        request(
            node(ssh_hosts[1]),
            "sh",
            "-c",
            "echo out; echo err >&2; pwd; exit 3",
            working_dir=str(tmp_path),
        )
    )
    assert (outcome.ok, outcome.exit_code, outcome.reason) == (False, 3, "exited with code 3")
    assert outcome.stdout == f"out\n{tmp_path}\n" and outcome.stderr == "err\n"


def test_a_host_with_another_key_or_an_unknown_key_is_refused(
    runner: SSHRunner, ssh_hosts: list[SSHHost], tmp_path: Path
) -> None:
    target, impostor = ssh_hosts[0], ssh_hosts[1]
    wrong = tmp_path / "wrong_known_hosts"
    wrong.write_text(f"[{target.address}]:{target.port} {impostor.host_key}\n")
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")

    changed = runner.run(request(node(target, ssh_known_hosts_file=str(wrong)), "true"))
    assert changed.not_started and "CHANGED" in changed.reason, changed.reason
    unknown = runner.run(request(node(target, "n2", ssh_known_hosts_file=str(empty)), "true"))
    assert unknown.not_started and "is unknown; refused" in unknown.reason
    pinned = runner.run(request(node(target, "n3", ssh_host_key=target.fingerprint), "true"))
    assert pinned.ok, pinned.reason
    tofu = node(target, "n4", ssh_known_hosts_file=str(empty), ssh_trust_on_first_use=True)
    assert runner.run(request(tofu, "true")).ok
    assert target.host_key.split()[1] in (tmp_path / "learned_hosts").read_text()


def test_a_timeout_kills_the_remote_process_group(
    runner: SSHRunner, ssh_hosts: list[SSHHost]
) -> None:
    host = ssh_hosts[2]
    marker = f"{300 + uuid.uuid4().int % 1000}.{uuid.uuid4().int % 1000}"
    started = time.monotonic()
    outcome = runner.run(
        request(
            node(host),
            "sh",
            "-c",
            f"sleep {marker} & sleep {marker}; echo never",
            timeout=timedelta(seconds=1),
        )
    )
    assert outcome.timed_out and outcome.reason == "timed out after 1s"
    assert time.monotonic() - started < 8
    wait_remote_gone(host.address, f"sleep {marker}", timeout=10)
    assert "never" not in outcome.stdout


def test_a_cancel_kills_the_remote_process_group_too(
    runner: SSHRunner, ssh_hosts: list[SSHHost]
) -> None:
    host = ssh_hosts[0]
    marker = f"{400 + uuid.uuid4().int % 1000}.{uuid.uuid4().int % 1000}"
    req = request(node(host), "sleep", marker)
    result: list[RunOutcome] = []
    thread = threading.Thread(target=lambda: result.append(runner.run(req)))
    thread.start()
    wait_for(lambda: remote_processes(host.address, f"sleep {marker}"), 10, "the remote sleep")
    req.cancel.set()
    thread.join(15)
    assert result and result[0].cancelled
    wait_remote_gone(host.address, f"sleep {marker}", timeout=10)


def test_large_output_is_bounded_with_a_marker(runner: SSHRunner, ssh_hosts: list[SSHHost]) -> None:
    outcome = runner.run(
        request(
            node(ssh_hosts[0]),
            "sh",
            "-c",
            "echo begin; head -c 30000000 /dev/zero | tr '\\0' a; echo; echo end",
            max_output_bytes=65536,
        )
    )
    assert outcome.ok and outcome.output_truncated
    assert outcome.stdout.startswith("begin\n") and outcome.stdout.endswith("end\n")
    assert "bytes of output omitted" in outcome.stdout
    assert len(outcome.stdout) < 65536 + 200


def test_runs_reuse_one_connection_and_open_more_beyond_the_session_cap(
    runner: SSHRunner, ssh_hosts: list[SSHHost]
) -> None:
    spec = node(ssh_hosts[1])
    for _ in range(10):
        assert runner.run(request(spec, "true")).ok
    assert runner.opened(spec.id) == 1

    outcomes: list[RunOutcome] = []
    threads = [
        threading.Thread(target=lambda: outcomes.append(runner.run(request(spec, "sleep", "1"))))
        for _ in range(14)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(outcomes) == 14 and all(o.ok for o in outcomes), [o.reason for o in outcomes]
    assert runner.opened(spec.id) >= 2  # 8 channels per connection at most


def test_a_stopped_sshd_is_a_run_that_never_started_with_the_reason(
    runner: SSHRunner, ssh_servers: SSHServers, ssh_hosts: list[SSHHost]
) -> None:
    host = ssh_hosts[2]
    ssh_servers.stop_server(host.address)
    outcome = runner.run(request(node(host), "true"))
    assert outcome.not_started and "connection refused" in outcome.reason
    assert f"{host.address}:{host.port}" in outcome.reason


# -- peers placing jobs on SSH nodes ----------------------------------------------------------


def ledger_command(ledger: Path) -> str:
    """Appends "<run id> <address of the host that ran it>"."""
    return f'echo "$DISTCRON_RUN_ID $(echo $SSH_CONNECTION | cut -d" " -f3)" >> {ledger}'


@pytest.fixture
def ssh_peer(make_peer, ssh_hosts: list[SSHHost]) -> Peer:  # type: ignore[no-untyped-def]
    """A standalone peer with three SSH nodes: ssh-1 (web), ssh-2 and ssh-3 (web, db)."""
    p: Peer = make_peer()
    for i, host in enumerate(ssh_hosts, 1):
        p.write_node(f"ssh-{i}", host.node_file(["web"] if i == 1 else ["web", "db"]))
    return p


def test_hosts_any_runs_each_slot_once_spread_over_the_ssh_nodes(
    ssh_peer: Peer, ssh_hosts: list[SSHHost], tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    ssh_peer.write_job(
        "spread",
        {
            "schedule": {"interval": "200ms"},
            "policy": {"hosts": "any", "roles": ["web"]},
            "shell": True,
            "command": ledger_command(ledger),
        },
    )
    ssh_peer.start()
    wait_for(lambda: len(ledger_lines(ledger)) >= 30, 30, "30 runs")
    assert duplicates(ledger) == []
    per_host = Counter(address for _, address in ledger_lines(ledger))
    assert set(per_host) == {h.address for h in ssh_hosts}, per_host


def test_a_cancel_through_the_api_ends_the_remote_process_group(
    ssh_peer: Peer, ssh_hosts: list[SSHHost]
) -> None:
    marker = f"{600 + uuid.uuid4().int % 1000}.{uuid.uuid4().int % 1000}"
    ssh_peer.write_job(
        "stuck",
        {
            "schedule": {"interval": "24h"},
            "policy": {"hosts": "any", "roles": ["db"]},
            "shell": True,
            "command": f"sleep {marker} & sleep {marker}; echo never",
        },
    )
    ssh_peer.start()
    run_id = ssh_peer.post("/api/v1/jobs/stuck/runs").json()["run_id"]

    def remote_sleeps() -> list[str] | None:
        for host in ssh_hosts:
            if len(remote_processes(host.address, f"sleep {marker}")) >= 2:
                return [host.address]
        return None

    address = wait_for(remote_sleeps, 20, "both remote sleeps")[0]
    accepted = ssh_peer.post(f"/api/v1/runs/{run_id}/cancel")
    assert accepted.status_code == 202, accepted.text
    run = ssh_peer.wait_run(run_id, ("failed",), timeout=20)
    assert run["reason"] == "cancelled by anonymous" and run["cancelled_by"] == "anonymous"
    assert run["node_id"] in ("ssh-2", "ssh-3") and "never" not in run["stdout"]
    wait_remote_gone(address, f"sleep {marker}", timeout=10)


def established_to(address: str, port: int) -> int:
    """TCP connections of this machine established to ``address:port`` (ss, iproute2)."""
    out = subprocess.run(
        ["ss", "-Htn", "state", "established", f"( dst {address} and dport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return len(out.splitlines())


def test_the_pooled_connection_of_a_removed_node_file_is_closed(
    ssh_peer: Peer, ssh_hosts: list[SSHHost]
) -> None:
    host = ssh_hosts[0]
    ssh_peer.write_node("solo", host.node_file(["solo"]))
    ssh_peer.write_job(
        "once",
        {
            "schedule": {"interval": "24h"},
            "policy": {"roles": ["solo"]},
            "command": "true",
            "shell": True,
        },
    )
    ssh_peer.start()
    run_id = ssh_peer.post("/api/v1/jobs/once/runs").json()["run_id"]
    ssh_peer.wait_run(run_id, ("succeeded",), timeout=20)
    assert established_to(host.address, host.port) >= 1  # pooled, kept for the next run

    (ssh_peer.nodes_dir / "solo.json").unlink()
    wait_for(lambda: established_to(host.address, host.port) == 0, 10, "the connection closed")


def test_hosts_all_runs_on_every_matching_node_and_roles_filter(
    ssh_peer: Peer, ssh_hosts: list[SSHHost], tmp_path: Path
) -> None:
    everywhere, db_only = tmp_path / "all", tmp_path / "db"
    ssh_peer.write_job(
        "everywhere",
        {
            "schedule": {"interval": "1s"},
            "policy": {"hosts": "all"},
            "shell": True,
            "command": ledger_command(everywhere),
        },
    )
    ssh_peer.write_job(
        "db-only",
        {
            "schedule": {"interval": "1s"},
            "policy": {"hosts": "any", "roles": ["db"]},
            "shell": True,
            "command": ledger_command(db_only),
        },
    )
    ssh_peer.start()
    wait_for(
        lambda: len(ledger_lines(everywhere)) >= 9 and len(ledger_lines(db_only)) >= 6,
        30,
        "runs of both jobs",
    )
    by_slot: dict[str, set[str]] = {}
    for run_id, address in ledger_lines(everywhere):
        slot_id, _, node_id = run_id.partition("~")
        assert node_id.startswith("ssh-")
        by_slot.setdefault(slot_id, set()).add(address)
    complete = [addresses for addresses in by_slot.values() if len(addresses) == 3]
    assert len(complete) >= 2 and all(a == {h.address for h in ssh_hosts} for a in complete)
    assert {address for _, address in ledger_lines(db_only)} <= {
        ssh_hosts[1].address,
        ssh_hosts[2].address,
    }
    assert duplicates(everywhere) == [] and duplicates(db_only) == []


def test_a_cluster_runs_ssh_jobs_through_a_leader_failover_without_a_double_run(
    zk_hosts: str, ssh_hosts: list[SSHHost], tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    cluster = Cluster(tmp_path / "cluster", zk_hosts, session_timeout=2.0)
    try:
        for i, host in enumerate(ssh_hosts, 1):
            cluster.write_node(f"ssh-{i}", host.node_file())
        cluster.write_job(
            "remote",
            {
                "schedule": {"interval": "500ms"},
                "policy": {"hosts": "any", "roles": ["worker"]},
                "misfire": {"policy": "run_all"},
                "shell": True,
                "command": ledger_command(ledger),
            },
        )
        cluster.start()
        wait_for(lambda: len(ledger_lines(ledger)) >= 5, 30, "the first remote runs")
        old = cluster.leader()
        killed_at = len(ledger_lines(ledger))
        cluster.kill9(old)
        cluster.leader(other_than=old.peer_id, timeout=15)
        wait_for(lambda: len(ledger_lines(ledger)) >= killed_at + 10, 30, "runs after failover")
        assert duplicates(ledger) == []
    finally:
        cluster.stop()


def node_view(peer: Peer, node_id: str) -> dict[str, Any]:
    nodes = peer.get("/api/v1/nodes").json()["nodes"]
    return next(n for n in nodes if n["id"] == node_id)


def test_a_stopped_sshd_makes_its_node_unhealthy_and_any_moves_on_until_it_is_back(
    ssh_peer: Peer, ssh_servers: SSHServers, ssh_hosts: list[SSHHost], tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    ssh_peer.write_job(
        "spread",
        {
            "schedule": {"interval": "300ms"},
            "policy": {"hosts": "any", "roles": ["web"]},
            "retries": {"count": 1, "backoff": "5s"},
            "concurrency": "allow",
            "shell": True,
            "command": ledger_command(ledger),
        },
    )
    ssh_peer.start()
    wait_for(lambda: len(ledger_lines(ledger)) >= 6, 30, "the first runs")
    down = ssh_hosts[2]
    ssh_servers.stop_server(down.address)

    view = wait_for(
        lambda: (v := node_view(ssh_peer, "ssh-3"))["healthy"] is False and v, 15, "ssh-3 unhealthy"
    )
    assert "connection refused" in view["health"]["reason"] and view["health"]["since"]
    assert node_view(ssh_peer, "ssh-1")["healthy"] is True
    mark = len(ledger_lines(ledger))
    wait_for(lambda: len(ledger_lines(ledger)) >= mark + 10, 30, "runs while ssh-3 is down")
    assert {address for _, address in ledger_lines(ledger)[mark:]} <= {
        ssh_hosts[0].address,
        ssh_hosts[1].address,
    }
    failed = ssh_peer.get("/api/v1/jobs/spread/runs", state="failed").json()["runs"]
    assert failed == [], "a run that could not connect moves to another node"

    ssh_servers.start_server(down.address)
    wait_for(lambda: node_view(ssh_peer, "ssh-3")["healthy"], 40, "ssh-3 healthy again")
    back = len(ledger_lines(ledger))
    wait_for(
        lambda: any(a == down.address for _, a in ledger_lines(ledger)[back:]),
        30,
        "a run on ssh-3 again",
    )
    assert duplicates(ledger) == []
