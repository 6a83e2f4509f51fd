"""Settling runs whose peer is gone: one rule, used by the leader and by a restarting peer.

A run is *abandoned* when its record says ``running`` on a peer that no longer
holds it (the peer died, or lost its ZooKeeper session, or restarted). What it
becomes, in this order:

1. its report is in the report store, terminal: the run ended and the peer died
   before recording that; the record takes the report's state (a report store that
   cannot be read now counts as no report: see ``settle_abandoned``);
2. the job is ``at_least_once`` and a live peer can take it: it goes back to
   ``assigned`` on that peer, under the same run id (it runs again);
3. otherwise ``unknown``: it may or may not have done its work, and it is not
   run again (at most once).

Every change is a compare-and-set that expects the record as it was read
(``running`` on the lost peer), so that two settlers (the leader and the
restarting peer) or a late finish by the lost peer itself cannot both apply.
"""

from __future__ import annotations

import logging
from datetime import datetime

from distcrond.coordination.base import CoordinationStore, StoreUnavailable
from distcrond.reporting.base import ReportStore
from distcrond.runs import RunRecord, RunReport, RunState

log = logging.getLogger("distcrond.recovery")


def settle_abandoned(
    coordination: CoordinationStore,
    reports: ReportStore,
    record: RunRecord,
    now: datetime,
    requeue_to: str | None,
    why: str,
) -> RunRecord | None:
    """Settle one abandoned run (see the module's rules); the record after, or None if it
    changed meanwhile (somebody else settled it)."""
    expect = {"state": RunState.RUNNING, "peer_id": record.peer_id}
    try:
        report = reports.get(record.run_id)
    except StoreUnavailable as e:
        # Waiting for the report store (Elasticsearch down) would keep the run active, and
        # a "forbid" job skipping its slots, for the whole outage. Without its report the
        # run is settled by rules 2 and 3; if the lost peer did write one (it waits in that
        # peer's spool), it reaches the report store later and tells the real outcome there.
        log.warning("run %s: its report cannot be read (%s); settled without it", record.run_id, e)
        report = None
    if report is not None and report.state.terminal:
        settled = coordination.finish_run(
            record.run_id,
            report.state,
            ended_at=report.ended_at or now,
            exit_code=report.exit_code,
            reason=report.reason,
            expect=expect,
        )
        return settled if settled is not None and settled.state.terminal else None
    if record.at_least_once and requeue_to is not None:
        requeued = coordination.update_run(
            record.run_id,
            expect=expect,
            state=RunState.ASSIGNED,
            peer_id=requeue_to,
            started_at=None,
            reason=f"{why}; at_least_once: running it again on {requeue_to}",
        )
        if requeued is not None:
            log.warning("run %s: %s; at_least_once: again on %s", record.run_id, why, requeue_to)
        return requeued
    reason = f"{why}; outcome unknown"
    settled = coordination.finish_run(
        record.run_id, RunState.UNKNOWN, ended_at=now, reason=reason, expect=expect
    )
    if settled is None or settled.state is not RunState.UNKNOWN or settled.reason != reason:
        return None  # it finished, or was settled by somebody else, meanwhile
    # The report follows the record here (not before it, as for a run that ran): a report
    # written first could overwrite the real one of a peer finishing at this very moment.
    reports.write([RunReport.from_record(settled)])
    log.warning("run %s: unknown (%s)", record.run_id, reason)
    return settled
