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


def _elasticsearch_reports(request: pytest.FixtureRequest) -> ReportStore:
    from distcrond.reporting.elasticsearch import ElasticsearchReportStore

    # es_index_prefix (through es_url) deletes the indices of earlier tests; the prefix
    # is this test's own. refresh=True: a write is searchable when it returns, at once
    # ("wait_for" would wait for the next scheduled refresh, up to a second per write).
    url: str = request.getfixturevalue("es_url")
    prefix: str = request.getfixturevalue("es_index_prefix")
    return ElasticsearchReportStore([url], index_prefix=prefix, refresh=True)


def _drop_es_template(store: ReportStore) -> None:
    """Delete the index template the store installed (the test server keeps templates)."""
    from deploy.services.elasticsearch import http_json
    from distcrond.reporting.elasticsearch import ElasticsearchReportStore

    assert isinstance(store, ElasticsearchReportStore)
    http_json(f"{store.urls[0]}/_index_template/{store.template_name}", method="DELETE")


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("elasticsearch", id="elasticsearch", marks=pytest.mark.elasticsearch),
    ]
)
def reports(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ReportStore]:
    """A fresh, empty report store."""
    if request.param == "elasticsearch":
        store = _elasticsearch_reports(request)
    else:
        store = _sqlite_reports(tmp_path)
    try:
        yield store
    finally:
        store.close()
        if request.param == "elasticsearch":
            _drop_es_template(store)
