"""The SSH test hosts themselves: what the SSH runner's integration tests rely on.

Checked with OpenSSH's own ``ssh`` client, and with paramiko (skipped where it is missing).
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from deploy.services.common import pid_alive
from deploy.services.sshd import (
    SSHD,
    RemoteProcess,
    SSHHost,
    SSHServers,
    ssh_banner,
)
from integration.ssh_fixtures import remote_processes, wait_remote_gone

if TYPE_CHECKING:
    import paramiko

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def ssh(
    host: SSHHost, command: str, *options: str, known_hosts: Path | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = host.ssh_command(known_hosts=known_hosts)
    cmd[1:1] = list(options)
    return subprocess.run([*cmd, command], capture_output=True, text=True, timeout=30, check=False)


def test_three_distinct_hosts_each_answer_as_its_own_address(ssh_hosts: list[SSHHost]) -> None:
    assert [h.address for h in ssh_hosts] == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    assert len({h.host_key for h in ssh_hosts}) == 3

    for host in ssh_hosts:
        result = ssh(host, "echo $SSH_CONNECTION; id -un")

        assert result.returncode == 0, result.stderr
        connection, user = result.stdout.split("\n")[:2]
        _client_ip, _client_port, server_ip, server_port = connection.split()
        assert (server_ip, int(server_port), user) == (host.address, host.port, "root")


def test_host_keys_and_fingerprints_are_what_the_servers_present(
    ssh_servers: SSHServers, ssh_hosts: list[SSHHost]
) -> None:
    known_hosts = ssh_servers.known_hosts.read_text().splitlines()
    for host in ssh_hosts:
        keygen = subprocess.run(
            ["ssh-keygen", "-lf", f"{ssh_servers.host_key_file(host.address)}.pub"],
            capture_output=True,
            text=True,
            check=True,
        )
        scan = subprocess.run(
            ["ssh-keyscan", "-t", "ed25519", "-p", str(host.port), host.address],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )

        assert keygen.stdout.split()[1] == host.fingerprint
        assert host.fingerprint.startswith("SHA256:")
        assert host.host_key.startswith("ssh-ed25519 AAAA")
        assert host.known_hosts_line == f"[{host.address}]:{host.port} {host.host_key}"
        assert host.known_hosts_line in known_hosts
        assert scan.stdout.strip() == host.known_hosts_line
        assert (host.client_key.stat().st_mode & 0o777) == 0o600


def test_a_wrong_or_missing_known_hosts_entry_is_rejected(
    ssh_hosts: list[SSHHost], tmp_path: Path
) -> None:
    first, second = ssh_hosts[0], ssh_hosts[1]
    wrong = tmp_path / "wrong_known_hosts"
    # The first host's name with the second host's key: a man in the middle, to ssh.
    wrong.write_text(f"[{first.address}]:{first.port} {second.host_key}\n")
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")

    changed = ssh(first, "echo reached", known_hosts=wrong)
    unknown = ssh(first, "echo reached", known_hosts=empty)

    assert changed.returncode == 255
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in changed.stderr
    assert unknown.returncode == 255
    assert "Host key verification failed" in unknown.stderr
    assert "reached" not in changed.stdout + unknown.stdout


def test_only_the_client_key_logs_in(ssh_hosts: list[SSHHost], tmp_path: Path) -> None:
    other_key = tmp_path / "other_key"
    subprocess.run(
        ["ssh-keygen", "-q", "-N", "", "-t", "ed25519", "-f", str(other_key)], check=True
    )
    host = ssh_hosts[0]
    cmd = host.ssh_command("echo reached")
    cmd[cmd.index(str(host.client_key))] = str(other_key)

    result = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)

    assert result.returncode == 255
    assert "Permission denied (publickey)" in result.stderr


def test_servers_accept_no_environment_from_clients(ssh_hosts: list[SSHHost]) -> None:
    result = ssh(ssh_hosts[0], "echo ${DISTCRON_PROBE:-unset}", "-o", "SetEnv=DISTCRON_PROBE=x")

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "unset"


def test_commands_run_in_a_shell_that_skips_bashrc(ssh_hosts: list[SSHHost]) -> None:
    result = ssh(ssh_hosts[0], "echo $SHLVL; echo $PATH")

    assert result.returncode == 0, result.stderr
    shlvl, path = result.stdout.split()
    assert shlvl == "2"
    assert path == "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # sshd's


def test_effective_config_of_each_host(ssh_servers: SSHServers) -> None:
    for address in ssh_servers.addresses:
        result = subprocess.run(
            [str(SSHD), "-T", "-f", str(ssh_servers.config_file(address))],
            capture_output=True,
            text=True,
            check=True,
        )
        effective = set(result.stdout.splitlines())

        assert f"listenaddress {address}:{ssh_servers.port}" in effective
        assert {
            "maxsessions 10",
            "usepam no",
            "strictmodes no",
            "passwordauthentication no",
            "kbdinteractiveauthentication no",
            "permitrootlogin without-password",
            "loglevel VERBOSE",
        } <= effective
        assert not [line for line in effective if line.startswith("acceptenv")]


def test_a_stopped_host_refuses_connections_and_comes_back(
    ssh_servers: SSHServers, ssh_hosts: list[SSHHost]
) -> None:
    down, up = ssh_hosts[1], ssh_hosts[0]

    ssh_servers.stop_server(down.address)
    refused = ssh(down, "echo reached")
    other = ssh(up, "echo reached")

    assert refused.returncode == 255
    assert "Connection refused" in refused.stderr
    assert ssh_banner(down.address, down.port) is None
    assert ssh_servers.pid(down.address) is None
    assert other.stdout.strip() == "reached"

    ssh_servers.start_server(down.address)
    back = ssh(down, "echo $SSH_CONNECTION")

    assert back.returncode == 0, back.stderr + ssh_servers.log_tail(down.address)
    assert back.stdout.split()[2] == down.address
    assert ssh_servers.host(down.address) == down  # same host key: known_hosts still valid


def test_stopping_a_host_kills_its_sessions_but_no_other_hosts(
    ssh_servers: SSHServers, ssh_hosts: list[SSHHost]
) -> None:
    down, up = ssh_hosts[2], ssh_hosts[0]
    marker = f"distcrond-test-{uuid.uuid4().hex}"
    clients = {
        host.address: subprocess.Popen(
            # The shell stays (the marker in its command line), its child sleeps.
            host.ssh_command(f"sleep 300; : {marker}"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for host in (down, up)
    }
    try:
        for host in (down, up):
            wait_until_running(host.address, marker)
            wait_until_running(host.address, "sleep 300", exact=True)

        ssh_servers.stop_server(down.address)

        assert clients[down.address].wait(timeout=10) == 255  # the connection dropped
        wait_remote_gone(down.address, marker)
        assert sessions(down.address, "sleep 300") == []
        assert clients[up.address].poll() is None
        assert len(remote_processes(up.address, marker)) == 1
    finally:
        for client in clients.values():
            client.kill()
            client.wait()
        ssh_servers.kill_remote_processes(up.address)  # see the next test


@pytest.mark.parametrize("pty", [False, True], ids=["no-pty", "pty"])
def test_a_remote_command_outlives_its_dropped_client_unless_it_has_a_pty(
    ssh_servers: SSHServers, ssh_hosts: list[SSHHost], pty: bool
) -> None:
    """sshd does not signal a command without a pty when the client goes; with one, SIGHUP."""
    host = ssh_hosts[1]
    marker = f"distcrond-test-{uuid.uuid4().hex}"
    cmd = host.ssh_command(f"sleep 300; : {marker}")
    if pty:
        cmd.insert(1, "-tt")
    client = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_until_running(host.address, marker)
        wait_until_running(host.address, "sleep 300", exact=True)
        [shell] = remote_processes(host.address, marker)

        client.kill()
        client.wait()

        if pty:
            wait_remote_gone(host.address, marker)
            assert sessions(host.address, "sleep 300") == []
        else:
            # Once the session's sshd process is gone, the command runs on, orphaned.
            wait_for(lambda: not pid_alive(shell.ppid), "the session's sshd to exit")
            assert [p.pid for p in remote_processes(host.address, marker)] == [shell.pid]
            assert len(sessions(host.address, "sleep 300")) == 1
    finally:
        client.kill()
        client.wait()
        ssh_servers.kill_remote_processes(host.address)
    assert remote_processes(host.address) == []


def test_stop_without_dropping_sessions_lets_them_finish(
    ssh_servers: SSHServers, ssh_hosts: list[SSHHost]
) -> None:
    host = ssh_hosts[0]
    marker = f"distcrond-test-{uuid.uuid4().hex}"
    client = subprocess.Popen(
        host.ssh_command(f"sleep 1.5; echo finished # {marker}"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until_running(host.address, marker)

        ssh_servers.stop_server(host.address, drop_sessions=False)
        out, err = client.communicate(timeout=20)

        assert client.returncode == 0, err
        assert out.strip() == "finished"
        assert ssh_banner(host.address, host.port) is None
    finally:
        client.kill()
        client.wait()


def paramiko_client(host: SSHHost, known_hosts: Path | None = None) -> paramiko.SSHClient:
    """A paramiko client logged in to ``host``; it rejects a host key not in ``known_hosts``."""
    ssh_lib = pytest.importorskip("paramiko")  # a dependency since recently
    client = ssh_lib.SSHClient()
    client.load_host_keys(str(known_hosts or host.known_hosts))
    client.set_missing_host_key_policy(ssh_lib.RejectPolicy())
    try:
        client.connect(
            host.address,
            port=host.port,
            username=host.user,
            key_filename=str(host.client_key),
            look_for_keys=False,
            allow_agent=False,
            timeout=10,
        )
    except BaseException:
        client.close()
        raise
    return client


def test_paramiko_checks_the_host_key_and_runs_commands(
    ssh_hosts: list[SSHHost], tmp_path: Path
) -> None:
    ssh_lib = pytest.importorskip("paramiko")
    host = ssh_hosts[0]
    client = paramiko_client(host)
    try:
        _stdin, stdout, _stderr = client.exec_command("echo $SSH_CONNECTION", timeout=10)
        assert stdout.read().decode().split()[2] == host.address
        assert stdout.channel.recv_exit_status() == 0
    finally:
        client.close()

    wrong = tmp_path / "wrong_known_hosts"
    wrong.write_text(f"[{host.address}]:{host.port} {ssh_hosts[1].host_key}\n")
    with pytest.raises(ssh_lib.BadHostKeyException):
        paramiko_client(host, wrong).close()


def test_max_sessions_caps_channels_per_connection(ssh_hosts: list[SSHHost]) -> None:
    ssh_lib = pytest.importorskip("paramiko")
    client = paramiko_client(ssh_hosts[0])
    try:
        transport = client.get_transport()
        assert transport is not None

        channels = [transport.open_session(timeout=10) for _ in range(10)]
        with pytest.raises(ssh_lib.ChannelException):
            transport.open_session(timeout=10)
        for channel in channels:
            channel.close()
    finally:
        client.close()


def sessions(address: str, args: str) -> list[RemoteProcess]:
    """Session processes on ``address`` whose command line is exactly ``args``."""
    return [p for p in remote_processes(address, args) if p.args == args]


def wait_for(condition: Callable[[], object], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def wait_until_running(
    address: str, marker: str, timeout: float = 15.0, exact: bool = False
) -> None:
    find = sessions if exact else remote_processes
    wait_for(lambda: find(address, marker), f"{marker!r} running on {address}", timeout)
