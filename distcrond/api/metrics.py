"""``GET /metrics``: the peer's figures in the Prometheus text format.

Every value is read at scrape time from the stores and the report spool's files,
like the rest of the API: the gunicorn workers share no memory with the daemon,
so there is no in-process registry to aggregate (prometheus_client's multiprocess
mode is for counters a worker increments; these are all gauges of shared state).
prometheus_client renders the format (escaping, HELP/TYPE lines, content type).
"""

from __future__ import annotations

from collections.abc import Iterator

import falcon
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

import distcrond
from distcrond.api.resources import APIContext, scheduler_health, store_status
from distcrond.coordination.base import StoreUnavailable
from distcrond.runs import ACTIVE_STATES


class _PeerCollector(Collector):
    """One scrape's gauges, read from the context's stores."""

    def __init__(self, ctx: APIContext) -> None:
        self.ctx = ctx

    def collect(self) -> Iterator[GaugeMetricFamily]:
        ctx = self.ctx
        info = GaugeMetricFamily(
            "distcron_peer_info", "This peer (always 1).", labels=["peer_id", "version"]
        )
        info.add_metric([ctx.peer_id, distcrond.__version__], 1)
        yield info

        up = GaugeMetricFamily(
            "distcron_store_up", "1 when the store answers.", labels=["store", "backend"]
        )
        statuses = {
            "coordination": store_status(ctx.coordination),
            "reports": store_status(ctx.reports),
        }
        for name, status in statuses.items():
            up.add_metric([name, status.backend], 1 if status.ok else 0)
        yield up

        if statuses["coordination"].ok:
            yield from self._cluster()
        yield from self._spool()

    def _cluster(self) -> Iterator[GaugeMetricFamily]:
        """The gauges read from the coordination store (none when it fails mid-scrape)."""
        ctx = self.ctx
        try:
            leader = ctx.leader()
            active = len(ctx.coordination.runs(states=ACTIVE_STATES))
            scheduler = scheduler_health(ctx, leader)
        except StoreUnavailable:
            return
        if scheduler.age is not None:
            yield GaugeMetricFamily(
                "distcron_scheduler_last_pass_age_seconds",
                "Seconds since the leader's newest completed scheduler pass (since it "
                "took over, before its first; with no leader, since the last one's).",
                value=scheduler.age,
            )
        yield GaugeMetricFamily(
            "distcron_scheduler_stall_timeout_seconds",
            "The leader's --leader-stall-timeout: past it without a pass, it resigns.",
            value=scheduler.stall_timeout,
        )
        yield GaugeMetricFamily(
            "distcron_is_leader",
            "1 when this peer is the leader.",
            value=1 if leader is not None and leader.peer_id == ctx.peer_id else 0,
        )
        yield GaugeMetricFamily(
            "distcron_active_runs",
            "Runs assigned or running in the whole cluster.",
            value=active,
        )

    def _spool(self) -> Iterator[GaugeMetricFamily]:
        spool = self.ctx.spool()
        if spool is None:
            return
        yield GaugeMetricFamily(
            "distcron_report_spool_reports",
            "Reports waiting in this peer's spool for Elasticsearch.",
            value=spool.reports,
        )
        yield GaugeMetricFamily(
            "distcron_report_spool_bytes",
            "Bytes of spool files waiting for Elasticsearch.",
            value=spool.bytes,
        )
        yield GaugeMetricFamily(
            "distcron_report_spool_oldest_age_seconds",
            "Age of the oldest waiting report (0 when none waits).",
            value=spool.oldest_age_s or 0.0,
        )
        yield GaugeMetricFamily(
            "distcron_report_spool_dead_letters",
            "Reports Elasticsearch refused for good, kept in the spool's dead-letter file.",
            value=spool.dead_letters,
        )


class Metrics:
    """The Prometheus scrape target."""

    def __init__(self, ctx: APIContext) -> None:
        self.ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_PeerCollector(self.ctx))
        resp.content_type = CONTENT_TYPE_LATEST
        resp.data = generate_latest(registry)
