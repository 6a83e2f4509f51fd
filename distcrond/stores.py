"""Opening the configured stores: one place that maps settings to backends."""

from __future__ import annotations

from distcrond.coordination.base import CoordinationStore
from distcrond.reporting.base import ReportStore
from distcrond.settings import Settings


class UnsupportedBackend(Exception):
    """The settings ask for a backend this build does not have yet."""


def open_coordination(settings: Settings) -> CoordinationStore:
    """ZooKeeper when ``--zookeeper`` is given (StoreUnavailable if it cannot be reached in
    the session timeout), else the embedded SQLite store under ``--state-dir``."""
    if settings.zookeeper:
        from distcrond.coordination.zookeeper import ZooKeeperCoordinationStore

        return ZooKeeperCoordinationStore(
            settings.zookeeper,
            root=settings.zk_root,
            session_timeout=settings.zk_session_timeout,
            auth=settings.zk_credentials,
        )
    from distcrond.coordination.sqlite import SQLiteCoordinationStore

    settings.state_dir.mkdir(parents=True, exist_ok=True)
    return SQLiteCoordinationStore(settings.coordination_db)


def open_reports(settings: Settings) -> ReportStore:
    if settings.es_urls:
        raise UnsupportedBackend("Elasticsearch reports (--es-url, --esHost) are not available yet")
    from distcrond.reporting.sqlite import SQLiteReportStore

    settings.state_dir.mkdir(parents=True, exist_ok=True)
    return SQLiteReportStore(settings.reports_db)
