"""Opening the configured stores: one place that maps settings to backends."""

from __future__ import annotations

from distcrond.coordination.base import CoordinationStore
from distcrond.reporting.base import ReportStore
from distcrond.settings import Settings


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


def open_reports(settings: Settings, *, writer: bool = False) -> ReportStore:
    """Elasticsearch when ``--es-url``/``--esHost`` is given, else SQLite under ``--state-dir``.

    The daemon opens it as the ``writer``: its Elasticsearch reports then go through the
    on-disk spool under ``--state-dir`` (durable at once, delivered in bulk, kept while
    Elasticsearch is down). The API workers only read, straight from Elasticsearch.
    """
    if settings.es_urls:
        from distcrond.reporting.elasticsearch import ElasticsearchReportStore

        store: ReportStore = ElasticsearchReportStore(
            settings.es_urls,
            index_prefix=settings.es_index_prefix,
            index_period=settings.es_index_period,
            username=settings.es_username,
            password=settings.es_password,
            api_key=settings.es_api_key,
            ca_certs=settings.es_ca_certs,
            verify_certs=settings.es_verify_certs,
        )
        if not writer:
            return store
        from distcrond.reporting.spool import SpooledReportStore

        return SpooledReportStore(store, settings.spool_dir)
    from distcrond.reporting.sqlite import SQLiteReportStore

    settings.state_dir.mkdir(parents=True, exist_ok=True)
    return SQLiteReportStore(settings.reports_db)
