"""Pytest fixtures for real OpenSSH servers as separate "hosts" on loopback addresses.

``ssh_servers`` (session) starts its own :class:`~deploy.services.sshd.SSHServers`,
in a directory under the pytest session's temporary folder: one sshd each on
127.0.0.2, 127.0.0.3 and 127.0.0.4, port 2222 (override with
``DISTCRON_TEST_SSH_PORT``), fresh host keys and a fresh client key. It never
adopts servers it did not start, such as those of ``deploy/services/sshd.py
start``: the tests stop hosts. If a port is taken the session fails at once and
says why. Logins are as root with the client key only; the servers accept no
environment variables from clients (no ``AcceptEnv``).

``ssh_hosts`` (function) makes sure all three hosts run (a previous test may have
stopped one) and returns them as :class:`~deploy.services.sshd.SSHHost` (address,
port, user, client_key, known_hosts, host_key, fingerprint, ``ssh_command()``).
To make a host unreachable: ``ssh_servers.stop_server(host.address)`` (its open
sessions are killed too, like a host going down); ``start_server`` brings it back.

``remote_processes(address)`` lists the processes that SSH sessions on that host
started. Every host is this machine, so it reads /proc (as ``ps -eo pid,args``
would) and picks the processes whose ``SSH_CONNECTION`` names that host's address
and port: enough to check that a remote command was killed.

Use them from a test module or conftest with::

    from integration.ssh_fixtures import ssh_hosts, ssh_servers  # noqa: F401

or load the module as a plugin (``-p integration.ssh_fixtures``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from deploy.services.common import port_is_free
from deploy.services.sshd import (
    DEFAULT_ADDRESSES,
    DEFAULT_PORT,
    RemoteProcess,
    SSHHost,
    SSHServers,
    SSHServersError,
    session_processes,
)

PORT_ENV = "DISTCRON_TEST_SSH_PORT"
PORT = int(os.environ.get(PORT_ENV, str(DEFAULT_PORT)))
ADDRESSES = DEFAULT_ADDRESSES
START_TIMEOUT = 30.0


def remote_processes(
    address: str, contains: str | None = None, port: int = PORT
) -> list[RemoteProcess]:
    """Live processes started by SSH sessions on ``address:port`` (pid, ppid, args).

    ``contains`` keeps only those whose command line contains that text, e.g. a
    marker the test put in its command (``sleep 300 # marker-1234``).
    """
    found = session_processes(address, port)
    return [p for p in found if contains is None or contains in p.args]


def wait_remote_gone(address: str, contains: str, timeout: float = 10.0, port: int = PORT) -> None:
    """Wait until no session process on ``address`` has ``contains`` in its command line."""
    deadline = time.monotonic() + timeout
    while left := remote_processes(address, contains, port):
        if time.monotonic() > deadline:
            raise AssertionError(f"still running on {address} after {timeout}s: {left}")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def ssh_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHServers]:
    """Three running sshd "hosts" for the whole test session; stopped at its end."""
    taken = [f"{a}:{PORT}" for a in ADDRESSES if not port_is_free(PORT, a)]
    if taken:
        pytest.fail(
            f"SSH test hosts: {', '.join(taken)} already in use. The tests start their own "
            f"sshd servers; stop whatever listens there (`python deploy/services/sshd.py "
            f"stop` for the dev ones) or set {PORT_ENV} to another port.",
            pytrace=False,
        )
    servers = SSHServers(tmp_path_factory.mktemp("sshd"), addresses=ADDRESSES, port=PORT)
    try:
        servers.start(timeout=START_TIMEOUT)
    except SSHServersError as e:
        servers.stop()
        pytest.fail(f"SSH test hosts did not start: {e}", pytrace=False)
    try:
        yield servers
    finally:
        servers.stop()


@pytest.fixture
def ssh_hosts(ssh_servers: SSHServers) -> list[SSHHost]:
    """All three hosts, running (restarted here if a previous test stopped one)."""
    try:
        ssh_servers.start(timeout=START_TIMEOUT)
    except SSHServersError as e:
        pytest.fail(f"SSH test hosts could not be restarted: {e}", pytrace=False)
    return ssh_servers.hosts
