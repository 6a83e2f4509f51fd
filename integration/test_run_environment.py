"""A real `distcrond` holding secrets in its environment: no run, local or over SSH, gets them.

The daemon starts with DISTCRON_ES_PASSWORD, DISTCRON_ES_API_KEY and DISTCRON_ZK_AUTH set
(harmless without --es-url and --zookeeper: it stays standalone on SQLite), an SSH node
whose key is encrypted with a passphrase from its environment, and ``--scrub-env
'MY_SECRET_*'`` with MY_SECRET_X set; jobs run ``env`` on its own host and on a real sshd,
and their stored output, read through the API, holds none of those names or values.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from deploy.services.sshd import SSHHost
from integration.peers import Peer

pytestmark = pytest.mark.timeout(120)

NOT_NOW = {"interval": "24h", "reference": "03:00"}  # runs only when triggered


def encrypted_copy(key: Path, passphrase: str, directory: Path) -> Path:
    """The client key, encrypted with ``passphrase`` (mode 0600, as the SSH runner wants)."""
    copy = directory / "id_ed25519_encrypted"
    shutil.copyfile(key, copy)
    copy.chmod(0o600)
    subprocess.run(
        ["ssh-keygen", "-q", "-p", "-P", "", "-N", passphrase, "-f", str(copy)], check=True
    )
    return copy


def env_job(roles: list[str]) -> dict[str, Any]:
    return {
        "schedule": NOT_NOW,
        "policy": {"hosts": "any", "roles": roles},
        "command": ["env"],
        "env": {"FROM_THE_JOB": "job-value"},
    }


def variables(run: dict[str, Any]) -> dict[str, str]:
    """The variables the run's ``env`` printed."""
    return dict(line.partition("=")[::2] for line in run["stdout"].splitlines())


def run_output(peer: Peer, job_id: str) -> dict[str, Any]:
    """Trigger the job and return its finished run as the API stores it."""
    r = peer.post(f"/api/v1/jobs/{job_id}/runs")
    assert r.status_code == 202, r.text
    run = peer.wait_run(r.json()["run_id"], ("succeeded", "failed"), timeout=30)
    assert run["state"] == "succeeded", run
    return run


def test_runs_local_and_over_ssh_get_none_of_the_daemons_secrets(
    make_peer: Callable[..., Peer],
    ssh_hosts: list[SSHHost],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tag = uuid.uuid4().hex[:12]
    secrets = {
        "DISTCRON_ES_PASSWORD": f"es-password-{tag}",
        "DISTCRON_ES_API_KEY": f"es-api-key-{tag}",
        "DISTCRON_ZK_AUTH": f"ops:zk-password-{tag}",
        "MY_SECRET_X": f"my-secret-x-{tag}",
        "NODE_KEY_PASSPHRASE": f"key-passphrase-{tag}",
    }
    for name, value in {**secrets, "ORDINARY_SETTING": "plain-value"}.items():
        monkeypatch.setenv(name, value)  # the daemon inherits the test's environment
    host = ssh_hosts[0]
    key = encrypted_copy(host.client_key, secrets["NODE_KEY_PASSPHRASE"], tmp_path)

    peer: Peer = make_peer(extra_args=["--scrub-env", "MY_SECRET_*"])
    peer.write_node("here", {"roles": ["here"], "connection_type": "local"})
    peer.write_node(
        "there",
        host.node_file(
            ["there"], ssh_private_key_file=str(key), ssh_key_passphrase_env="NODE_KEY_PASSPHRASE"
        ),
    )
    peer.write_job("env-here", env_job(["here"]))
    peer.write_job("env-there", env_job(["there"]))
    peer.start()

    local, remote = run_output(peer, "env-here"), run_output(peer, "env-there")
    assert (local["node_id"], remote["node_id"]) == ("here", "there")
    assert variables(local)["ORDINARY_SETTING"] == "plain-value"
    assert variables(remote)["SSH_CONNECTION"].split()[2] == host.address  # ran on the sshd
    for run in (local, remote):
        output = run["stdout"] + run["stderr"]
        assert "FROM_THE_JOB=job-value" in output and f"DISTCRON_RUN_ID={run['run_id']}" in output
        for name, value in secrets.items():
            assert name not in output and value not in output, (name, run["node_id"])
    for value in secrets.values():  # nor in any run the report store holds
        assert peer.get("/api/v1/runs", q=value).json()["runs"] == []
