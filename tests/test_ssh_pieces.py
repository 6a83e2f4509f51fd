"""The SSH runner's pieces that need no server: the remote script, keys, host key decisions.

The end-to-end behaviour against real sshd servers is in integration/test_ssh.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import paramiko
import pytest
from pydantic import ValidationError

from distcrond.config.models import NodeSpec, SSHOptions
from distcrond.execution.base import RunRequest
from distcrond.execution.ssh import (
    HostKeyPolicy,
    SSHError,
    fingerprint,
    load_private_key,
    remote_script,
)

pytestmark = pytest.mark.timeout(60)

NASTY = [
    "it's",
    'say "hi"',
    "a; rm -rf /tmp/x",
    "$(touch /tmp/pwned)",
    "`id`",
    "two\nlines",
    "",
    "*",
]


def keygen(path: Path, passphrase: str = "", kind: str = "ed25519") -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", passphrase, "-f", str(path)], check=True)
    return path


def options(**fields: object) -> SSHOptions:
    base: dict[str, object] = {
        "ssh_user": "root",
        "ssh_host": "127.0.0.2:2222",
        "ssh_private_key_file": "/k",
    }
    return SSHOptions.model_validate({**base, **fields})


def test_the_remote_script_hands_every_argument_and_variable_over_unchanged(
    tmp_path: Path,
) -> None:
    argv = (
        sys.executable,
        "-c",
        "import json, os, sys; print(json.dumps([sys.argv[1:], dict(os.environ)]))",
        *NASTY,
    )
    env = {"DISTCRON_RUN_ID": "job@2026-11-27T00:00:00.000000Z", "QUOTED": "it's $(x) `y`\nz"}
    request = RunRequest(
        run_id="r",
        job_id="j",
        node_id="n",
        peer_id="p",
        slot=datetime.now(UTC),
        argv=argv,
        env=env,
        working_dir=str(tmp_path),
    )
    done = subprocess.run(
        ["/bin/sh", "-s"],
        input=remote_script(request),
        capture_output=True,
        check=True,
        env={"PATH": os.environ["PATH"]},
        cwd="/",
    )
    args, seen_env = json.loads(done.stdout)
    assert args == NASTY
    assert (
        seen_env["QUOTED"] == env["QUOTED"]
        and seen_env["DISTCRON_RUN_ID"] == env["DISTCRON_RUN_ID"]
    )
    assert seen_env.get("PWD") in (str(tmp_path), None)
    assert done.stderr.startswith(b"DISTCRON-PID ")
    assert not Path("/tmp/pwned").exists()


def test_a_missing_working_directory_fails_the_script_with_127(tmp_path: Path) -> None:
    request = RunRequest(
        run_id="r",
        job_id="j",
        node_id="n",
        peer_id="p",
        slot=datetime.now(UTC),
        argv=("true",),
        working_dir=str(tmp_path / "nope"),
    )
    done = subprocess.run(["/bin/sh", "-s"], input=remote_script(request), capture_output=True)
    assert done.returncode == 127 and b"nope" in done.stderr


def test_a_private_key_readable_by_others_is_refused_naming_the_file(tmp_path: Path) -> None:
    key = keygen(tmp_path / "id")
    key.chmod(0o644)
    with pytest.raises(SSHError, match=r"id is accessible by others \(mode 0644\).*chmod 600"):
        load_private_key(str(key), None)
    key.chmod(0o600)
    assert isinstance(load_private_key(str(key), None), paramiko.PKey)


def test_an_encrypted_key_needs_its_passphrase_variable_and_never_shows_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = keygen(tmp_path / "id", passphrase="correct horse")
    with pytest.raises(SSHError, match="ssh_key_passphrase_env"):
        load_private_key(str(key), None)
    with pytest.raises(SSHError, match=r"\$KEY_PASS, which is not set"):
        load_private_key(str(key), "KEY_PASS")
    monkeypatch.setenv("KEY_PASS", "wrong horse")
    with pytest.raises(SSHError) as bad:
        load_private_key(str(key), "KEY_PASS")
    assert "horse" not in str(bad.value)
    monkeypatch.setenv("KEY_PASS", "correct horse")
    assert isinstance(load_private_key(str(key), "KEY_PASS"), paramiko.PKey)


def host_key(tmp_path: Path, name: str = "host") -> paramiko.PKey:
    keygen(tmp_path / name)
    return paramiko.PKey.from_path(str(tmp_path / name))


def test_a_known_host_key_is_accepted_and_a_changed_or_unknown_one_refused(tmp_path: Path) -> None:
    good, other = host_key(tmp_path, "good"), host_key(tmp_path, "other")
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.2]:2222 {good.get_name()} {good.get_base64()}\n")
    policy = HostKeyPolicy(learned_hosts=tmp_path / "learned")
    opts = options(ssh_known_hosts_file=str(known))

    policy.verify(opts, good)
    with pytest.raises(SSHError, match=r"host key of \[127.0.0.2\]:2222 has CHANGED"):
        policy.verify(opts, other)
    with pytest.raises(SSHError, match="is unknown; refused"):
        policy.verify(options(ssh_host="127.0.0.3:2222", ssh_known_hosts_file=str(known)), good)


def test_a_pinned_key_or_fingerprint_decides_alone(tmp_path: Path) -> None:
    good, other = host_key(tmp_path, "good"), host_key(tmp_path, "other")
    policy = HostKeyPolicy(learned_hosts=None)
    for pin in (f"{good.get_name()} {good.get_base64()} comment", fingerprint(good)):
        policy.verify(options(ssh_host_key=pin), good)
        with pytest.raises(SSHError, match="not the pinned ssh_host_key"):
            policy.verify(options(ssh_host_key=pin), other)


def test_trust_on_first_use_remembers_the_first_key_and_refuses_a_change(tmp_path: Path) -> None:
    first, second = host_key(tmp_path, "first"), host_key(tmp_path, "second")
    learned = tmp_path / "state" / "ssh_known_hosts"
    opts = options(ssh_trust_on_first_use=True, ssh_known_hosts_file=str(tmp_path / "none"))
    HostKeyPolicy(learned).verify(opts, first)
    assert learned.read_text().startswith("[127.0.0.2]:2222 ssh-ed25519 ")
    HostKeyPolicy(learned).verify(opts, first)  # a new runner (a restart) knows it
    with pytest.raises(SSHError, match="CHANGED"):
        HostKeyPolicy(learned).verify(opts, second)


def test_fingerprints_match_ssh_keygen(tmp_path: Path) -> None:
    key = host_key(tmp_path)
    printed = subprocess.run(
        ["ssh-keygen", "-lf", str(tmp_path / "host.pub")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[1]
    assert fingerprint(key) == printed


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("ssh_host_key", "not a key", "public key line"),
        ("ssh_key_passphrase_env", "NOT-A-NAME", "environment variable name"),
        ("connect_timeout", "0s", "more than 0"),
        ("max_concurrent_runs", 0, "greater than or equal to 1"),
        ("ssh_password", "hunter2", "Extra inputs are not permitted"),
    ],
)
def test_bad_ssh_options_name_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ValidationError) as e:
        NodeSpec.model_validate(
            {
                "id": "n",
                "connection_type": "ssh",
                "connection_options": {
                    "ssh_user": "u",
                    "ssh_host": "h",
                    "ssh_private_key_file": "/k",
                    field: value,
                },
            }
        )
    assert field in str(e.value) and message in str(e.value)
