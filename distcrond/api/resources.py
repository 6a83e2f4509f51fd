"""The API's resources: one plain class per route, reading the stores and nothing else.

Every resource gets the same :class:`APIContext` (the stores, this peer's id
and the clock). Nothing here keeps state between requests: the daemon
publishes what the API shows (leader, peers, loaded config, run records) into
the coordination store, and finished runs live in the report store.

Errors are raised as falcon HTTP errors (or left to propagate, for
:class:`StoreUnavailable` and the unexpected); ``app.py`` renders them all as
JSON in one place.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, NoReturn

import falcon

import distcrond
from distcrond.api import openapi
from distcrond.api.auth import has_role, requester
from distcrond.clock import Clock
from distcrond.config.models import JobSpec
from distcrond.config.tokens import Role
from distcrond.coordination.base import (
    ConfigSnapshot,
    CoordinationStore,
    LeaderInfo,
    SchedulerPass,
    StoreStatus,
    StoreUnavailable,
    TriggerRequest,
)
from distcrond.reporting.base import ReportStore, RunPage, RunQuery
from distcrond.reporting.spool import SpoolStats, read_spool_stats
from distcrond.runs import (
    ACTIVE_STATES,
    RunRecord,
    RunReport,
    RunState,
    format_slot,
    parse_slot,
    run_id_for,
    split_run_id,
)
from distcrond.scheduling.schedules import NoSlotError, next_slot

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
MAX_LIMIT = 1000
DEFAULT_LIMIT = 50
# A slot is an instant: [slot, slot + 1µs) selects exactly one slot in the report store.
ONE_MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True)
class APIContext:
    """The collaborators every resource shares."""

    coordination: CoordinationStore
    reports: ReportStore
    peer_id: str
    clock: Clock
    # The daemon's report spool (Elasticsearch reports wait there), None with SQLite reports.
    spool_dir: Path | None = None
    # This peer's --leader-stall-timeout: health's bound until a leader has published its own.
    stall_timeout: float = 5.0

    def spool(self) -> SpoolStats | None:
        return read_spool_stats(self.spool_dir) if self.spool_dir is not None else None

    def leader(self) -> LeaderInfo | None:
        return self.coordination.leader()

    def snapshot(self, leader: LeaderInfo | None = None) -> ConfigSnapshot | None:
        """The config to show: the leader's, else this peer's own (None if neither published)."""
        leader = leader if leader is not None else self.leader()
        if leader is not None:
            snap = self.coordination.config(leader.peer_id)
            if snap is not None:
                return snap
        return self.coordination.config(self.peer_id)

    def jobs(self) -> dict[str, dict[str, Any]]:
        snap = self.snapshot()
        return snap.jobs if snap else {}

    def job(self, job_id: str, snap: ConfigSnapshot | None = None) -> dict[str, Any]:
        """A job's definition (from ``snap``, else the config shown), or 404."""
        snap = snap if snap is not None else self.snapshot()
        job = snap.jobs.get(job_id) if snap else None
        if job is None:
            description = f"No job {job_id!r} is loaded."
            if snap and _job_errors(snap, job_id):
                description += f" Its file has errors: see {API_PREFIX}/config/errors."
            raise falcon.HTTPNotFound(title="Unknown job", description=description)
        return job


# -- shared views ---------------------------------------------------------------


def _job_errors(snap: ConfigSnapshot, job_id: str) -> list[dict[str, Any]]:
    name = f"{job_id}.json"
    return [
        e
        for e in snap.errors
        if str(e.get("file", "")) == name or str(e.get("file", "")).endswith(f"/{name}")
    ]


def _next_slot(
    ctx: APIContext, job_id: str, job: dict[str, Any], cursor: datetime | None
) -> str | None:
    """The next slot after now (or after the cursor, when ahead); None when disabled."""
    if not job.get("enabled", True):
        return None
    try:
        spec = JobSpec.model_validate(job)
    except ValueError:
        # The daemon publishes validated specs; a snapshot from another version may not parse.
        log.warning("cannot parse the published definition of job %r", job_id, exc_info=True)
        return None
    now = ctx.clock.now()
    after = max(now, cursor) if cursor is not None else now
    try:
        return format_slot(next_slot(spec.schedule, job_id, after))
    except NoSlotError:  # a cron date that never comes (Feb 30)
        return None


def _last_run(ctx: APIContext, job_id: str) -> dict[str, Any] | None:
    page = ctx.reports.list_runs(RunQuery(job_id=job_id, limit=1))
    if not page.runs:
        return None
    run = page.runs[0]
    return {
        "run_id": run.run_id,
        "state": run.state.value,
        "slot": format_slot(run.slot),
        "exit_code": run.exit_code,
        "ended_at": format_slot(run.ended_at) if run.ended_at else None,
    }


def _active_records(ctx: APIContext, job_id: str | None = None) -> list[RunRecord]:
    """Active runs, newest slot first."""
    records = ctx.coordination.runs(job_id=job_id, states=ACTIVE_STATES)
    return sorted(records, key=lambda r: (r.slot, r.run_id), reverse=True)


@dataclass(frozen=True)
class SchedulerHealth:
    """Whether the cluster schedules: some leader completed a pass within the stall timeout.

    ``age`` is how long the current leader has gone without a pass: since its newest one,
    or since it took over when it has none yet; with no leader, since the last leader's
    newest pass. It is measured on this peer's clock against the leader's (NTP-close
    clocks assumed); None when no pass was ever published and no leader is known."""

    ok: bool
    last_pass: SchedulerPass | None  # the current leader's newest pass
    age: float | None
    stall_timeout: float
    detail: str

    def to_json(self) -> dict[str, Any]:
        last = self.last_pass
        return {
            "ok": self.ok,
            "last_pass": format_slot(last.at) if last else None,
            "last_pass_epoch": last.epoch if last else None,
            "last_pass_age_seconds": round(self.age, 3) if self.age is not None else None,
            "stall_timeout_seconds": self.stall_timeout,
            "detail": self.detail,
        }


def scheduler_health(ctx: APIContext, leader: LeaderInfo | None) -> SchedulerHealth:
    """The scheduler's health, from the pass the leader published last (see SchedulerHealth)."""
    published = ctx.coordination.scheduler_pass()
    timeout = published.stall_timeout if published else ctx.stall_timeout
    current = (
        published if published and (leader is None or published.epoch == leader.epoch) else None
    )
    if current is not None:
        since, what = current.at, f"the last pass of epoch {current.epoch}"
    elif leader is not None:
        since, what = leader.since, f"leader {leader.peer_id} took over (epoch {leader.epoch})"
    else:
        return SchedulerHealth(False, None, None, timeout, "no leader has scheduled yet")
    age = max(0.0, (ctx.clock.now() - since).total_seconds())
    ok = age <= timeout
    detail = f"{age:.1f} s since {what}" + ("" if leader else "; no leader now")
    if not ok:
        detail += f": over the stall timeout of {timeout:g} s"
    return SchedulerHealth(ok, current, age, timeout, detail)


def store_status(store: CoordinationStore | ReportStore) -> StoreStatus:
    try:
        return store.status()
    except Exception as exc:  # a health check reports a failing store, it does not fail
        log.warning("%s store status failed", store.backend, exc_info=True)
        return StoreStatus(ok=False, backend=store.backend, detail=f"{type(exc).__name__}: {exc}")


def _timestamp_param(req: falcon.Request, name: str) -> datetime | None:
    text = req.get_param(name)
    if not text:
        return None
    try:
        return parse_slot(text)
    except ValueError:
        raise falcon.HTTPInvalidParam(
            "must be an RFC 3339 instant with a time zone, like 2026-11-27T03:10:00Z", name
        ) from None


def _states_param(req: falcon.Request) -> tuple[RunState, ...]:
    # Both ?state=a,b and ?state=a&state=b.
    names = [n.strip() for v in req.get_param_as_list("state") or [] for n in v.split(",")]
    try:
        return tuple(RunState(n) for n in names if n)
    except ValueError:
        valid = ", ".join(s.value for s in RunState)
        raise falcon.HTTPInvalidParam(
            f"must be a comma-separated list of: {valid}", "state"
        ) from None


def _run_query(req: falcon.Request, job_id: str | None) -> RunQuery:
    """The filters and page of a runs listing, from the query string (400 when bad)."""
    return RunQuery(
        job_id=job_id,
        states=_states_param(req),
        node_id=req.get_param("node") or None,
        since=_timestamp_param(req, "since"),
        until=_timestamp_param(req, "until"),
        limit=req.get_param_as_int(
            "limit", min_value=1, max_value=MAX_LIMIT, default=DEFAULT_LIMIT
        ),
        cursor=req.get_param("cursor") or None,
        text=(req.get_param("q") or "").strip() or None,
    )


def _list_runs(ctx: APIContext, query: RunQuery) -> RunPage:
    try:
        return ctx.reports.list_runs(query)
    except ValueError as exc:  # the store's word for a cursor it did not issue
        raise falcon.HTTPInvalidParam(
            str(exc) or "is not a cursor of this query", "cursor"
        ) from None


# -- resources ------------------------------------------------------------------


class Live:
    """Liveness: 200 while this process answers requests. Open without a token, and reads
    no store (a probe that restarts peers must not restart them for a store's outage)."""

    REQUIRED_ROLES: ClassVar[Mapping[str, Role | None]] = {"GET": None, "HEAD": None}

    def __init__(self, ctx: APIContext) -> None:
        self.ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"status": "ok", "peer_id": self.ctx.peer_id}


class Health:
    """Whether this peer's stores answer; 503 (with the same JSON body) when one does not."""

    def __init__(self, ctx: APIContext) -> None:
        self.ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        coordination = store_status(self.ctx.coordination)
        reports = store_status(self.ctx.reports)
        leader: LeaderInfo | None = None
        scheduler: SchedulerHealth | None = None
        if coordination.ok:
            try:
                leader = self.ctx.leader()
                scheduler = scheduler_health(self.ctx, leader)
            except StoreUnavailable:
                coordination = StoreStatus(False, coordination.backend, "leader lookup failed")
        ok = coordination.ok and reports.ok and scheduler is not None and scheduler.ok
        resp.status = falcon.HTTP_200 if ok else falcon.HTTP_503
        resp.media = {
            "status": "ok" if ok else "degraded",
            "peer_id": self.ctx.peer_id,
            "is_leader": leader is not None and leader.peer_id == self.ctx.peer_id,
            "leader_id": leader.peer_id if leader else None,
            "epoch": leader.epoch if leader else None,
            "version": distcrond.__version__,
            "stores": {"coordination": coordination.to_json(), "reports": reports.to_json()},
            "scheduler": scheduler.to_json() if scheduler else None,
        }
        spool = self.ctx.spool()
        if spool is not None:
            resp.media["report_spool"] = spool.to_json()


class Ready:
    """Readiness: 200 when this peer can do its part, 503 (same body) when not: its
    stores answer and, when it leads, its scheduler completed a pass within the stall
    timeout. A follower is ready while another peer's scheduler stalls (that is the
    leader's failure, shown by ``/health``); ``reasons`` says what is wrong."""

    def __init__(self, ctx: APIContext) -> None:
        self.ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        stores = {
            "coordination": store_status(self.ctx.coordination),
            "reports": store_status(self.ctx.reports),
        }
        reasons = [f"{name} store: {st.detail}" for name, st in stores.items() if not st.ok]
        leading = False
        if stores["coordination"].ok:
            try:
                leader = self.ctx.leader()
                leading = leader is not None and leader.peer_id == self.ctx.peer_id
                scheduler = scheduler_health(self.ctx, leader) if leading else None
            except StoreUnavailable as e:
                reasons.append(f"coordination store: {e}")
            else:
                if scheduler is not None and not scheduler.ok:
                    reasons.append(f"this peer leads and its scheduler stalls: {scheduler.detail}")
        resp.status = falcon.HTTP_503 if reasons else falcon.HTTP_200
        resp.media = {
            "status": "not ready" if reasons else "ready",
            "peer_id": self.ctx.peer_id,
            "is_leader": leading,
            "reasons": reasons,
        }


class Cluster:
    """The leader, the live peers and which of them run a config other than the leader's."""

    def __init__(self, ctx: APIContext) -> None:
        self.ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        leader = self.ctx.leader()
        peers = self.ctx.coordination.peers()
        reference: str | None = None
        if leader is not None:
            reference = next((p.config_digest for p in peers if p.peer_id == leader.peer_id), None)
            if reference is None:
                snap = self.ctx.coordination.config(leader.peer_id)
                reference = snap.digest if snap else None
        out = []
        drift = []
        for peer in peers:
            drifting = reference is not None and peer.config_digest != reference
            if drifting:
                drift.append(peer.peer_id)
            out.append(
                peer.to_json()
                | {
                    "is_leader": leader is not None and peer.peer_id == leader.peer_id,
                    "config_drift": drifting,
                }
            )
        resp.media = {
            "leader": (
                {
                    "peer_id": leader.peer_id,
                    "epoch": leader.epoch,
                    "since": format_slot(leader.since),
                }
                if leader
                else None
            ),
            "epoch": leader.epoch if leader else None,
            "peers": out,
            "drift": drift,
        }


class Jobs:
    """Every loaded job, with its next slot and last finished run."""

    def __init__(self, ctx: APIContext) -> None:
        self.ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        jobs = self.ctx.jobs()
        cursors = self.ctx.coordination.cursors()
        resp.media = {
            "jobs": [
                {
                    "id": job_id,
                    "description": job.get("description", ""),
                    "enabled": job.get("enabled", True),
                    "schedule": job.get("schedule"),
                    "policy": job.get("policy"),
                    "next_slot": _next_slot(self.ctx, job_id, job, cursors.get(job_id)),
                    "last_run": _last_run(self.ctx, job_id),
                }
                for job_id, job in sorted(jobs.items())
            ]
        }


class Job:
    """One job: its definition, next slot, last and active runs, and its file's errors."""

    def __init__(self, ctx: APIContext) -> None:
        self.ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response, job_id: str) -> None:
        snap = self.ctx.snapshot()
        job = self.ctx.job(job_id, snap)
        cursor = self.ctx.coordination.cursors().get(job_id)
        resp.media = {
            "job": job if has_role(req, Role.ADMIN) else _env_names_only(job),
            "next_slot": _next_slot(self.ctx, job_id, job, cursor),
            "last_run": _last_run(self.ctx, job_id),
            "active_runs": [r.to_json() for r in _active_records(self.ctx, job_id)],
            "errors": _job_errors(snap, job_id) if snap else [],
        }


class JobRuns:
    """A job's runs (GET: active ones, then finished ones, newest first) and "run now" (POST)."""

    REQUIRED_ROLES: ClassVar[Mapping[str, Role | None]] = {"POST": Role.OPERATE}

    def __init__(self, ctx: APIContext) -> None:
        self.ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response, job_id: str) -> None:
        query = _run_query(req, job_id)
        page = _list_runs(self.ctx, query)
        active: list[RunRecord] = []
        if query.cursor is None and query.text is None:  # active runs have no output yet
            active = [
                r
                for r in _active_records(self.ctx, job_id)
                if (not query.states or r.state in query.states)
                and (query.node_id is None or r.node_id == query.node_id)
                and (query.since is None or r.slot >= query.since)
                and (query.until is None or r.slot < query.until)
            ]
        if (
            not page.runs
            and not active
            and query.cursor is None
            and query.text is None
            and job_id not in self.ctx.jobs()
        ):
            # History of a job that is no longer loaded is still served; a name never seen is not.
            raise falcon.HTTPNotFound(
                title="Unknown job", description=f"No job {job_id!r} is loaded or has runs."
            )
        resp.media = {
            "job_id": job_id,
            "active": [r.to_json() for r in active],
            "runs": [r.to_json() for r in page.runs],
            "next_cursor": page.next_cursor,
        }

    def on_post(self, req: falcon.Request, resp: falcon.Response, job_id: str) -> None:
        _no_fields_body(req)
        self.ctx.job(job_id)  # 404 when unknown; a disabled job may be run by hand
        now = self.ctx.clock.now()
        run_id = run_id_for(job_id, now)
        self.ctx.coordination.request_trigger(
            TriggerRequest(
                run_id=run_id,
                job_id=job_id,
                slot=now,
                requested_at=now,
                requested_by=requester(req),
            )
        )
        status_url = f"{API_PREFIX}/runs/{run_id}"
        resp.status = falcon.HTTP_202
        resp.location = status_url
        resp.media = {
            "run_id": run_id,
            "job_id": job_id,
            "slot": format_slot(now),
            "status_url": status_url,
        }


class Runs:
    """Finished runs of every job, newest first: filters, and ``q`` to search their output."""

    def __init__(self, ctx: APIContext) -> None:
        self.ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        query = _run_query(req, req.get_param("job") or None)
        page = _list_runs(self.ctx, query)
        resp.media = {"runs": [r.to_json() for r in page.runs], "next_cursor": page.next_cursor}


class Run:
    """One run by id: finished (reports), active (coordination), queued, or a per-node group."""

    def __init__(self, ctx: APIContext) -> None:
        self.ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response, run_id: str) -> None:
        job_id, slot, node_id = _split_run_id(run_id)

        report = self.ctx.reports.get(run_id)
        if report is not None:
            resp.media = report.to_json() | {"source": "reports"}
            return
        record = self.ctx.coordination.get_run(run_id)
        if record is not None:
            resp.media = record.to_json() | {
                "stdout": None,
                "stderr": None,
                "source": "coordination",
            }
            return
        for trigger in self.ctx.coordination.pending_triggers():
            if trigger.run_id == run_id:
                resp.media = {
                    "run_id": run_id,
                    "job_id": trigger.job_id,
                    "slot": format_slot(trigger.slot),
                    "state": "queued",
                    "source": "triggers",
                }
                return
        if node_id is None:
            group = self._node_runs(run_id, job_id, slot)
            if group:
                resp.media = {
                    "run_id": run_id,
                    "job_id": job_id,
                    "slot": format_slot(slot),
                    "source": "nodes",
                    "runs": group,
                }
                return
        raise falcon.HTTPNotFound(title="Unknown run", description=f"No run {run_id!r} is known.")

    def _node_runs(self, run_id: str, job_id: str, slot: datetime) -> list[dict[str, Any]]:
        """The per-node runs (``<run_id>~<node>``) of a slot a policy ran on several nodes."""
        prefix = f"{run_id}~"
        found: dict[str, dict[str, Any]] = {}
        try:
            until = slot + ONE_MICROSECOND
        except OverflowError:  # the calendar's last instant
            until = slot
        query = RunQuery(job_id=job_id, since=slot, until=until, limit=MAX_LIMIT)
        reports: list[RunReport] = self.ctx.reports.list_runs(query).runs
        for report in reports:
            if report.run_id.startswith(prefix):
                found[report.run_id] = report.to_json() | {"source": "reports"}
        for record in self.ctx.coordination.runs(job_id=job_id):
            if record.run_id.startswith(prefix) and record.run_id not in found:
                found[record.run_id] = record.to_json() | {
                    "stdout": None,
                    "stderr": None,
                    "source": "coordination",
                }
        return [found[k] for k in sorted(found)]


class RunCancel:
    """Ask for an active run to end: the peer executing it ends the command's whole
    process group (a run not started yet never starts), and the run ends ``failed``,
    "cancelled by <token name>". 202 while it is being ended, 409 once it has ended
    (or while it is only queued), 404 for a run nobody knows."""

    REQUIRED_ROLES: ClassVar[Mapping[str, Role | None]] = {"POST": Role.OPERATE}

    def __init__(self, ctx: APIContext) -> None:
        self.ctx = ctx

    def on_post(self, req: falcon.Request, resp: falcon.Response, run_id: str) -> None:
        _split_run_id(run_id)
        _no_fields_body(req)
        coordination = self.ctx.coordination
        if not coordination.request_cancel(run_id, requester(req)):  # unknown or ended
            self._not_active(run_id)
        record = coordination.get_run(run_id)
        if record is None:  # ended and pruned since
            self._not_active(run_id)
        status_url = f"{API_PREFIX}/runs/{run_id}"
        resp.status = falcon.HTTP_202
        resp.location = status_url
        resp.media = {
            "run_id": run_id,
            "state": record.state.value,
            "cancel_requested": True,
            "cancelled_by": record.cancelled_by,
            "status_url": status_url,
        }

    def _not_active(self, run_id: str) -> NoReturn:
        """Raise the answer for a run that cannot be cancelled (409 or 404)."""
        report = self.ctx.reports.get(run_id)
        record = self.ctx.coordination.get_run(run_id)
        state = report.state.value if report else record.state.value if record else None
        if state is not None:
            raise falcon.HTTPConflict(
                title="Run has ended", description=f"Run {run_id!r} has ended: {state}."
            )
        if any(t.run_id == run_id for t in self.ctx.coordination.pending_triggers()):
            raise falcon.HTTPConflict(
                title="Run is queued",
                description=f"Run {run_id!r} is queued for the leader and not assigned "
                "yet; it can be cancelled once it is (in a moment).",
            )
        raise falcon.HTTPNotFound(title="Unknown run", description=f"No run {run_id!r} is known.")


HIDDEN = "<hidden>"  # a job's env value, shown to the role admin only


def _env_names_only(job: dict[str, Any]) -> dict[str, Any]:
    """The job's definition with its env values hidden (they often hold credentials)."""
    env = job.get("env")
    if not env:
        return job
    return job | {"env": dict.fromkeys(env, HIDDEN)}


def _split_run_id(run_id: str) -> tuple[str, datetime, str | None]:
    """(job, slot, node) of a run id from a path; 400 when it is not one."""
    try:
        return split_run_id(run_id)
    except ValueError:
        raise falcon.HTTPBadRequest(
            title="Invalid run id",
            description=f"{run_id!r} is not a run id '<job>@<RFC 3339 slot>[~<node>]'.",
        ) from None


def _no_fields_body(req: falcon.Request) -> None:
    """A POST whose body carries no fields yet: optional, but JSON (an object) if present."""
    try:
        body = req.get_media(default_when_empty=None)
    except RecursionError:  # [[[[...: json.loads gives up, as it should
        raise falcon.HTTPBadRequest(
            title="Invalid body", description="The body is nested too deeply to be read."
        ) from None
    if body is not None and not isinstance(body, dict):
        raise falcon.HTTPBadRequest(
            title="Invalid body", description="The body, if any, must be a JSON object."
        )


class Nodes:
    """The loaded nodes, with how many active runs each has and whether it is healthy."""

    def __init__(self, ctx: APIContext) -> None:
        self.ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        snap = self.ctx.snapshot()
        nodes = snap.nodes if snap else {}
        counts: dict[str, int] = {}
        for record in self.ctx.coordination.runs(states=ACTIVE_STATES):
            if record.node_id:
                counts[record.node_id] = counts.get(record.node_id, 0) + 1
        health = self.ctx.coordination.node_health()
        resp.media = {
            "nodes": [
                node
                | {
                    "id": node_id,
                    "active_runs": counts.get(node_id, 0),
                    "healthy": node_id not in health,
                    "health": health[node_id].to_json() if node_id in health else None,
                }
                for node_id, node in sorted(nodes.items())
            ]
        }


class ConfigErrors:
    """The job and node file errors of the config shown (the leader's, else this peer's)."""

    def __init__(self, ctx: APIContext) -> None:
        self.ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        snap = self.ctx.snapshot()
        resp.media = {
            "peer_id": snap.peer_id if snap else None,
            "errors": list(snap.errors) if snap else [],
        }


class OpenAPI:
    """This API's OpenAPI document."""

    def __init__(self, ctx: APIContext) -> None:
        self.ctx = ctx

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = openapi.document()
