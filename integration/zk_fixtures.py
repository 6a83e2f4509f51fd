"""Pytest fixtures for a real 3-server ZooKeeper ensemble (Debian's package, loopback).

``zk_ensemble`` (session) starts its own ensemble, in a directory under the
pytest session's temporary folder, on client ports 2181-2183 (override the
base with ``DISTCRON_TEST_ZK_BASE_PORT``; avoid 2191-2199). It never adopts an
ensemble it did not start, such as the one from ``make services``: the tests
stop and kill servers, which must not happen to somebody's dev ensemble. If
the ports are taken the session fails at once and says why.

``zk_hosts`` (function) gives each test its own empty chroot on that ensemble,
the kazoo harness habit: ``127.0.0.1:2181,127.0.0.1:2182,127.0.0.1:2183/distcron-test-<uuid>``.

Use them from a test module or conftest with::

    from integration.zk_fixtures import zk_ensemble, zk_hosts  # noqa: F401
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Iterator

import pytest
from kazoo.client import KazooClient

from deploy.services.common import port_is_free
from deploy.services.zookeeper import Ensemble, EnsembleError

BASE_PORT_ENV = "DISTCRON_TEST_ZK_BASE_PORT"
SERVERS = 3
START_TIMEOUT = 90.0


@contextlib.contextmanager
def kazoo_client(hosts: str, timeout: float = 10.0) -> Iterator[KazooClient]:
    """A started KazooClient on ``hosts`` (may carry a chroot), stopped and closed on exit.

    ``client.retry(...)`` retries through connection loss for up to 30 s.
    """
    retry = {"max_tries": -1, "deadline": 30.0, "max_delay": 1.0}
    client = KazooClient(hosts=hosts, timeout=timeout, command_retry=retry, connection_retry=retry)
    client.start(timeout=30)
    try:
        yield client
    finally:
        client.stop()
        client.close()


@pytest.fixture(scope="session")
def zk_ensemble(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ensemble]:
    """A running 3-server ensemble for the whole test session; stopped at its end."""
    base_port = int(os.environ.get(BASE_PORT_ENV, "2181"))
    ensemble = Ensemble(
        tmp_path_factory.mktemp("zookeeper"), servers=SERVERS, base_port=base_port, tick_ms=500
    )
    taken = [
        ensemble.client_port(n) for n in ensemble.ids if not port_is_free(ensemble.client_port(n))
    ]
    if taken:
        pytest.fail(
            f"ZooKeeper test ensemble: port(s) {taken} already in use. The tests start their own "
            f"ensemble; stop whatever listens there (`make services-stop` for the dev ensemble) "
            f"or set {BASE_PORT_ENV} to another base port.",
            pytrace=False,
        )
    try:
        ensemble.start(timeout=START_TIMEOUT)
    except EnsembleError as e:
        ensemble.stop()
        pytest.fail(f"ZooKeeper test ensemble did not start: {e}", pytrace=False)
    try:
        yield ensemble
    finally:
        ensemble.stop()


@pytest.fixture
def zk_hosts(zk_ensemble: Ensemble) -> Iterator[str]:
    """Connection string with a fresh chroot (created here, deleted after the test)."""
    # A previous test may have stopped a server: every test starts on the full ensemble.
    zk_ensemble.start(timeout=START_TIMEOUT)
    chroot = f"/distcron-test-{uuid.uuid4().hex}"
    with kazoo_client(zk_ensemble.hosts) as client:
        client.ensure_path(chroot)
    yield zk_ensemble.hosts + chroot
    try:
        with kazoo_client(zk_ensemble.hosts) as client:
            client.delete(chroot, recursive=True)
    except Exception as e:  # cleanup only: a test that broke the ensemble has failed already
        logging.getLogger(__name__).warning("could not delete chroot %s: %r", chroot, e)
