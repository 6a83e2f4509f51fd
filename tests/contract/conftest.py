"""One fixture per pluggable store, parametrized over its backends.

Every backend passes the same contract tests. A backend that needs an outside
service (ZooKeeper, Elasticsearch) is added as a ``pytest.param`` carrying its
marker, and builds an isolated store (its own chroot or index) per test.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from distcrond.coordination.base import CoordinationStore
from distcrond.reporting.base import ReportStore

# Developers may point the ZooKeeper parameter at a server of their own
# ("host:port"); by default it runs on the project's 3-server test ensemble.
DEV_ZK_ENV = "DISTCRON_TEST_ZK"


def _sqlite_coordination(tmp_path: Path) -> CoordinationStore:
    from distcrond.coordination.sqlite import SQLiteCoordinationStore

    # A short poll makes the poll thread race the immediate notifications often.
    return SQLiteCoordinationStore(tmp_path / "coordination.sqlite3", poll_interval=0.02)


def _zookeeper_coordination(request: pytest.FixtureRequest) -> CoordinationStore:
    from distcrond.coordination.zookeeper import ZooKeeperCoordinationStore

    dev_server = os.environ.get(DEV_ZK_ENV)
    if dev_server:  # a unique chroot (the store creates it), left behind on the dev server
        hosts = f"{dev_server}/distcron-test-{uuid.uuid4().hex}"
    else:
        hosts = request.getfixturevalue("zk_hosts")
    return ZooKeeperCoordinationStore(hosts, session_timeout=4.0)


def _sqlite_reports(tmp_path: Path) -> ReportStore:
    from distcrond.reporting.sqlite import SQLiteReportStore

    return SQLiteReportStore(tmp_path / "reports.sqlite3")


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("zookeeper", id="zookeeper", marks=pytest.mark.zookeeper),
    ]
)
def coordination(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CoordinationStore]:
    """A fresh, empty coordination store."""
    if request.param == "zookeeper":
        store = _zookeeper_coordination(request)
    else:
        store = _sqlite_coordination(tmp_path)
    try:
        yield store
    finally:
        store.close()


@pytest.fixture(params=[pytest.param("sqlite", id="sqlite")])
def reports(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ReportStore]:
    """A fresh, empty report store."""
    builders = {"sqlite": _sqlite_reports}
    store = builders[request.param](tmp_path)
    try:
        yield store
    finally:
        store.close()
