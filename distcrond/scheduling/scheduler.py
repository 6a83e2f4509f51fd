"""The leader's scheduler: turns due slots into fenced run records.

It runs only while this peer is leader (``start(epoch)`` / ``stop()``), on one
thread. Each pass takes every due slot, decides each one's fate — run it
(placed on node(s) and executing peer(s)), skip it (concurrency), or fail it
(no eligible node) — and records the whole batch in one fenced
``record_runs`` call together with the jobs' cursors. The executing peers
learn of their runs from the store; the scheduler never runs a command, so a
slow or noisy job cannot delay anybody's slot.

Slots that fell due while no peer was leader (found from the cursors when
leadership starts) follow each job's ``misfire`` policy.

The leader also settles the runs of peers that are gone (every second, and
when it takes over): a run assigned to a peer that is no longer live moves to
a live one (it never started), and a run whose executing peer lost it (no
heartbeat) is settled by :mod:`distcrond.recovery`. A live peer that leaves a
due run unclaimed is suspected of being stopped or cut off: its overdue runs
move, and it gets no new ones for a while (:mod:`distcrond.scheduling.suspects`).
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from distcrond.clock import Clock
from distcrond.config.loader import LoadedConfig
from distcrond.config.models import JobSpec, MisfirePolicy, NodeSpec
from distcrond.coordination.base import CoordinationStore, FencedOut
from distcrond.recovery import settle_abandoned
from distcrond.reporting.base import ReportStore
from distcrond.runs import RunRecord, RunReport, RunState, Trigger, run_id_for
from distcrond.scheduling.placement import executing_peer, place
from distcrond.scheduling.schedules import NoSlotError, next_slot, slots_between
from distcrond.scheduling.suspects import HOLD_S, OVERDUE, SuspectPeers, overdue

log = logging.getLogger("distcrond.scheduler")

# Bounds on the work one catch-up may do for one job, so that a peer that was
# down for a month with a 1 s job neither stalls nor floods the stores.
MAX_CATCH_UP_RUNS = 1000
MAX_MISSED_RECORDS = 1000
PRUNE_EVERY = timedelta(seconds=60)
RECONCILE_EVERY = timedelta(seconds=1)
# How long the live peers and unhealthy nodes read for one pass serve the next ones: a
# peer that died meanwhile is caught by the reconciliation (its runs move on).
VIEW_TTL = 0.25  # seconds
# Slots are recorded (and so assigned) this long before they are due, and the executing
# peer starts them at their instant: the pass, the fenced write and the claim are then
# done by the time the slot comes, instead of making every run that much late. A slot
# whose job still has a run in progress is decided at its instant, as before.
LOOKAHEAD = timedelta(milliseconds=50)
# A pass also takes the slots due up to this much later: under load (hundreds of slots a
# second) the passes, each a fenced write and a read of the active runs, then come at most
# this often instead of once per slot, and the runs they hand to a peer arrive together.
PASS_SPAN = timedelta(milliseconds=50)
# Under forbid and misfire run_all, a due slot whose job's previous run is still active
# waits for that run (looked at again this often), at most until the job's next slot or
# the end of its misfire grace, whichever comes first; then it is skipped.
HOLD_POLL = timedelta(milliseconds=50)
# While the store's connection is away (a ZooKeeper server lost), a pass waits for it up
# to this long instead of starting: begun then, its first read would wait in the client
# until the reconnection, and the slots due meanwhile would need a second write; begun
# at the reconnection, one write takes them all.
STORE_WAIT_S = 0.25


@dataclass
class _Batch:
    """The runs decided in one pass, and the view of the cluster they were decided on."""

    now: datetime
    nodes_load: Counter[str]
    peers_load: Counter[str]
    active_by_job: defaultdict[str, list[RunRecord]]
    live_peers: list[str]
    unhealthy: set[str] = field(default_factory=set)
    records: list[RunRecord] = field(default_factory=list)
    cursors: dict[str, datetime] = field(default_factory=dict)
    cancels: list[str] = field(default_factory=list)


class Scheduler:
    """Schedules every enabled job while this peer leads. Thread-safe entry points."""

    def __init__(
        self,
        coordination: CoordinationStore,
        reports: ReportStore,
        config: Callable[[], LoadedConfig],
        clock: Clock,
        supported_types: Collection[str],
        retention: timedelta = timedelta(minutes=15),
        retention_count: int | None = 10_000,
        on_fenced: Callable[[int], None] | None = None,
    ) -> None:
        self._coordination = coordination
        self._reports = reports
        self._config = config
        self._clock = clock
        self._supported = tuple(supported_types)
        self._retention = retention
        # A short retention is pruned often enough that the store holds about that much.
        self._prune_every = min(PRUNE_EVERY, max(retention / 2, timedelta(seconds=1)))
        # At most this many finished records are kept: a prune also comes once half as many
        # runs were recorded since the last one, so the store holds at most 1.5 times that.
        self._retention_count = retention_count
        self._recorded = 0  # runs recorded since the last prune
        # Told the epoch that was fenced out mid-pass (on this scheduler's thread: it must
        # only hand the news on, never wait for this thread to end).
        self._on_fenced = on_fenced
        # When the newest pass of the current term completed (the clock's monotonic time).
        self._last_pass: float | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._config_dirty = False
        self._triggers_dirty = True
        self._thread: threading.Thread | None = None
        self._ending: threading.Thread | None = None  # the thread stop() last ended
        self._epoch = 0
        # Per job: the spec its next slot was computed with, and that next slot.
        self._specs: dict[str, JobSpec] = {}
        self._next: dict[str, datetime] = {}
        self._heap: list[tuple[datetime, str]] = []
        # Slots whose job has a run in progress: (when to look again, slot, job id). One
        # inside the lookahead is decided at its instant; a due run_all one waits (HOLD_POLL).
        self._held: list[tuple[datetime, datetime, str]] = []
        self._last_prune: datetime | None = None
        self._last_reconcile: datetime | None = None
        # The active runs as this leader knows them (its own records, refreshed from the
        # store's index every pass and wholesale at each reconciliation).
        self._active: dict[str, RunRecord] = {}
        self._view: tuple[float, list[str], set[str]] | None = None
        self._suspects = SuspectPeers(clock)
        self._threaded = False
        self._pruner: threading.Thread | None = None
        self._bootstrapped = False

    # -- control (any thread) --------------------------------------------------
    def start(self, epoch: int, thread: bool = True) -> None:
        """Begin scheduling as the leader of ``epoch`` (``thread=False``: tests call step()).
        RuntimeError while running, or while the thread of the previous term still runs."""
        if self._thread is not None:
            raise RuntimeError("scheduler already running")
        if self._ending is not None and self._ending.is_alive():
            raise RuntimeError(f"the scheduler of epoch {self._epoch} has not stopped yet")
        self._epoch = epoch
        self._last_pass = None
        self._stop.clear()
        self._config_dirty = False
        self._triggers_dirty = True
        self._active.clear()
        self._view = None
        self._threaded = thread
        if not thread:
            return
        self._thread = threading.Thread(target=self._main, name="scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> bool:
        """Stop scheduling and wait (at most ``timeout`` seconds) for the thread to end;
        False when it is still running then (``start`` refuses until it has ended)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return True
        self._ending = thread
        self._stop.set()
        self._wake.set()
        if thread is not threading.current_thread():
            thread.join(timeout)
        return not thread.is_alive() or thread is threading.current_thread()

    @property
    def running(self) -> bool:
        return self._thread is not None

    @property
    def last_pass(self) -> tuple[int, float | None]:
        """The current term's epoch, and when its newest pass completed (the clock's
        monotonic seconds; None before the first). A pass that failed does not count."""
        return self._epoch, self._last_pass

    def config_changed(self) -> None:
        self._config_dirty = True
        self._wake.set()

    def triggers_queued(self) -> None:
        self._triggers_dirty = True
        self._wake.set()

    # -- the loop ----------------------------------------------------------------
    def _main(self) -> None:
        log.info("scheduler started (epoch %d)", self._epoch)
        try:
            while not self._stop.is_set():
                self.step()
                self._wake.wait(self._sleep_time())
                self._wake.clear()
        except FencedOut:
            log.warning("deposed: epoch %d is fenced out; scheduling stops", self._epoch)
            self._stop.set()
            if self._on_fenced is not None:
                self._on_fenced(self._epoch)
        finally:
            self._specs.clear()
            self._next.clear()
            self._heap.clear()
            self._held.clear()
            self._bootstrapped = False
            self._last_reconcile = None
            log.info("scheduler stopped (epoch %d)", self._epoch)

    def _sleep_time(self) -> float:
        if self._config_dirty or self._triggers_dirty:
            return 0.0
        wake = [self._heap[0][0] - LOOKAHEAD] if self._heap else []
        wake += [self._held[0][0]] if self._held else []
        if not wake:
            return 1.0
        return min(1.0, (min(wake) - self._clock.now()).total_seconds())

    def step(self) -> None:
        """One pass (the loop's body, public for tests that drive a fake clock): on the first,
        settle missed slots; then apply config changes and triggers, record due slots, prune.
        Never raises for a store problem (it logs, and the next pass retries), except FencedOut."""
        if not self._coordination.wait_connected(STORE_WAIT_S):
            return  # the store is away: nothing could be recorded; the next pass waits again
        try:
            if not self._bootstrapped:
                self._bootstrap()
                self._bootstrapped = True
            if self._config_dirty:
                self._config_dirty = False
                self._sync_config(self._clock.now())
            if self._triggers_dirty:
                self._triggers_dirty = False
                self._take_triggers()
            started = self._clock.monotonic()
            self._dispatch_due()
            if self._clock.monotonic() - started > PASS_SPAN.total_seconds():
                # Its write waited on the store (a ZooKeeper server's loss holds it until
                # the reconnection): the slots that fell due meanwhile go out now, before
                # the reconciliation reads every active run.
                self._dispatch_due()
            self._maybe_reconcile()
            self._maybe_prune()
            self._last_pass = self._clock.monotonic()
        except FencedOut:
            raise
        except Exception:
            log.exception("scheduler pass failed; retrying")
            self._stop.wait(0.5)

    def _bootstrap(self) -> None:
        """On becoming leader: find where each job was, and settle what was missed meanwhile."""
        self._specs.clear()
        self._next.clear()
        self._heap.clear()
        self._held.clear()
        cursors = self._coordination.cursors()
        now = self._clock.now()
        batch = self._new_batch(now)
        for job in self._enabled_jobs():
            self._specs[job.id] = job
            cursor = cursors.get(job.id)
            if cursor is not None and cursor < now:
                self._catch_up(job, cursor, batch)
            self._set_next(job, now)
        self._commit(batch)

    def _enabled_jobs(self) -> Iterable[JobSpec]:
        return (job for job in self._config().jobs.values() if job.enabled)

    def _set_next(self, job: JobSpec, after: datetime) -> None:
        """Queue the job's first slot after ``after`` (none if its schedule has no more)."""
        slot = _next_or_none(job, after)
        if slot is None:
            self._next.pop(job.id, None)
            return
        self._next[job.id] = slot
        heapq.heappush(self._heap, (slot, job.id))

    def _sync_config(self, now: datetime) -> None:
        """Follow job files: new jobs start at their next slot, changed schedules are recomputed."""
        current = {job.id: job for job in self._enabled_jobs()}
        for job_id in list(self._specs):
            if job_id not in current:
                del self._specs[job_id]
                self._next.pop(job_id, None)  # its heap entry becomes stale and is dropped
        for job_id, job in current.items():
            old = self._specs.get(job_id)
            self._specs[job_id] = job
            if old is None or old.schedule != job.schedule:
                self._set_next(job, now)

    def _dispatch_due(self) -> None:
        now = self._clock.now()
        candidates: list[tuple[datetime, str]] = []
        while self._held and self._held[0][0] <= now:
            _, slot, job_id = heapq.heappop(self._held)
            candidates.append((slot, job_id))
        while self._heap and self._heap[0][0] <= now + LOOKAHEAD + PASS_SPAN:
            candidates.append(heapq.heappop(self._heap))
        # Else: a stale entry of a changed or removed job.
        candidates = [
            (slot, job_id) for slot, job_id in candidates if self._next.get(job_id) == slot
        ]
        if not candidates:
            return
        batch = self._new_batch(now)
        due: list[tuple[datetime, str]] = []
        for slot, job_id in candidates:
            job = self._specs[job_id]
            look_again = None
            # Only a slot that can wait asks whether its job's active runs block it.
            if (slot > now or _waits_for_previous(job)) and self._blocking(
                job, batch, Trigger.SCHEDULE
            ):
                look_again = _look_again(job, slot, now)
            if look_again is not None:
                heapq.heappush(self._held, (look_again, slot, job_id))  # fate depends on that run
            else:
                due.append((slot, job_id))
        if not due:
            return
        for slot, job_id in due:
            job = self._specs[job_id]
            self._decide(job, slot, Trigger.SCHEDULE, run_id_for(job.id, slot), batch)
            batch.cursors[job_id] = slot
            following = _next_or_none(job, slot)
            if following is None:
                del self._next[job_id]
            else:
                self._next[job_id] = following
        try:
            self._commit(batch)
        except FencedOut:
            raise
        except Exception:
            for slot, job_id in due:  # put them back: they are retried, late, next pass
                self._next[job_id] = slot
                heapq.heappush(self._heap, (slot, job_id))
            raise
        for _slot, job_id in due:
            if job_id in self._next:
                heapq.heappush(self._heap, (self._next[job_id], job_id))

    # -- deciding one slot -------------------------------------------------------
    def _new_batch(self, now: datetime) -> _Batch:
        live_peers, unhealthy, ids = self._cluster_view()
        active = self._active_runs(ids)
        by_job: defaultdict[str, list[RunRecord]] = defaultdict(list)
        for run in active:
            by_job[run.job_id].append(run)
        live_peers = self._suspects.eligible(live_peers)
        return _Batch(
            now=now,
            nodes_load=Counter(r.node_id for r in active if r.node_id),
            peers_load=Counter(r.peer_id for r in active if r.peer_id),
            active_by_job=by_job,
            live_peers=live_peers,
            unhealthy=unhealthy,
        )

    def _active_runs(self, ids: set[str]) -> list[RunRecord]:
        """The active runs of the store's index ``ids``: records read only for ids this
        leader has not seen (all of them on its first pass)."""
        for run_id in self._active.keys() - ids:
            del self._active[run_id]
        if unknown := ids - self._active.keys():
            self._remember(self._coordination.get_runs(sorted(unknown)))
        return [self._active[i] for i in ids if i in self._active]

    def _remember(self, records: Iterable[RunRecord]) -> None:
        for record in records:
            if record.state.terminal:
                self._active.pop(record.run_id, None)
            else:
                self._active[record.run_id] = record

    def _cluster_view(self) -> tuple[list[str], set[str], set[str]]:
        """Live peers and unhealthy nodes (read at most every VIEW_TTL seconds, with the
        active runs' ids, in one store call), and the active runs' ids (every pass)."""
        now = self._clock.monotonic()
        if self._view is None or now - self._view[0] >= VIEW_TTL:
            view = self._coordination.scheduling_view()
            live = [p.peer_id for p in view.peers]
            self._view = (now, live, set(view.node_health))
            return live, set(view.node_health), view.active_run_ids
        return self._view[1], self._view[2], self._coordination.active_run_ids()

    @staticmethod
    def _blocking(job: JobSpec, batch: _Batch, trigger: Trigger) -> list[RunRecord]:
        """The job's active runs that a new slot must wait for (forbid) or replace."""
        if trigger is Trigger.MISFIRE or job.concurrency == "allow":
            return []
        active = batch.active_by_job[job.id]
        if job.misfire.policy is MisfirePolicy.RUN_ALL:
            # run_all asked for every missed slot: its catch-up runs (which overlap each
            # other anyway) do not make the next scheduled slots skip.
            return [r for r in active if r.trigger is not Trigger.MISFIRE]
        return list(active)

    def _decide(
        self,
        job: JobSpec,
        slot: datetime,
        trigger: Trigger,
        base_run_id: str,
        batch: _Batch,
        by: str | None = None,
    ) -> None:
        """Add the records of one slot to the batch: skipped, failed, or assigned run(s);
        ``by``: who asked for a manual one (each record says so)."""
        active = batch.active_by_job[job.id]
        blocking = self._blocking(job, batch, trigger)
        if blocking:
            if job.concurrency == "forbid":
                first = blocking[0]
                reason = f"concurrency forbid: run {first.run_id} is still {first.state.value}"
                if trigger is Trigger.SCHEDULE and _waits_for_previous(job):
                    reason += " (misfire run_all: the slot waited for it until its deadline)"
                batch.records.append(
                    self._terminal(
                        job.id, slot, trigger, base_run_id, RunState.SKIPPED, batch.now, reason, by
                    )
                )
                return
            if job.concurrency == "replace":
                batch.cancels.extend(r.run_id for r in blocking)
        config = self._config()
        placement = place(
            job,
            base_run_id,
            config.nodes,
            batch.live_peers,
            batch.nodes_load,
            batch.peers_load,
            self._supported,
            batch.unhealthy,
        )
        if not placement.assignments:
            batch.records.append(
                self._terminal(
                    job.id,
                    slot,
                    trigger,
                    base_run_id,
                    RunState.FAILED,
                    batch.now,
                    placement.reason,
                    by,
                )
            )
            return
        per_node = job.policy.hosts != "any" and job.policy.hosts != 1
        for assignment in placement.assignments:
            run_id = f"{base_run_id}~{assignment.node_id}" if per_node else base_run_id
            record = RunRecord(
                run_id=run_id,
                job_id=job.id,
                slot=slot,
                node_id=assignment.node_id,
                peer_id=assignment.peer_id,
                state=RunState.ASSIGNED,
                trigger=trigger,
                epoch=self._epoch,
                created_at=batch.now,
                at_least_once=job.delivery == "at_least_once",
                triggered_by=by,
            )
            batch.records.append(record)
            batch.nodes_load[assignment.node_id] += 1
            batch.peers_load[assignment.peer_id] += 1
            active.append(record)

    def _terminal(
        self,
        job_id: str,
        slot: datetime,
        trigger: Trigger,
        run_id: str,
        state: RunState,
        now: datetime,
        reason: str,
        by: str | None = None,
    ) -> RunRecord:
        return RunRecord(
            run_id=run_id,
            job_id=job_id,
            slot=slot,
            node_id=None,
            peer_id=None,
            state=state,
            trigger=trigger,
            epoch=self._epoch,
            created_at=now,
            ended_at=now,
            reason=reason,
            triggered_by=by,
        )

    def _commit(self, batch: _Batch) -> None:
        """Record the batch (fenced), then cancel what it replaces and report what ended at once."""
        if not batch.records and not batch.cursors:
            return
        created = self._coordination.record_runs(self._epoch, batch.records, batch.cursors)
        self._recorded += len(created)
        self._remember(created)
        for run_id in batch.cancels:
            self._coordination.request_cancel(run_id)
        ended = [RunReport.from_record(r) for r in created if r.state.terminal]
        if ended:
            self._reports.write(ended)
            for report in ended:
                log.warning("run %s: %s (%s)", report.run_id, report.state.value, report.reason)

    # -- misfires ------------------------------------------------------------------
    def _catch_up(self, job: JobSpec, cursor: datetime, batch: _Batch) -> None:
        """Settle the slots in (cursor, now]: run some by the misfire policy, the rest missed."""
        now = batch.now
        horizon = max(cursor, now - job.misfire.grace)
        missed = _bounded(slots_between(job.schedule, job.id, cursor, horizon), MAX_MISSED_RECORDS)
        catchable = list(slots_between(job.schedule, job.id, horizon, now))
        policy = job.misfire.policy
        if policy is MisfirePolicy.SKIP:
            to_run: list[datetime] = []
        elif policy is MisfirePolicy.RUN_ONCE:
            to_run = catchable[-1:]
        else:
            to_run = catchable[-MAX_CATCH_UP_RUNS:]
        running = set(to_run)
        dropped = [s for s in catchable if s not in running]
        for slot in [*missed.items, *dropped]:
            batch.records.append(
                self._terminal(
                    job.id,
                    slot,
                    Trigger.MISFIRE,
                    run_id_for(job.id, slot),
                    RunState.MISSED,
                    now,
                    f"fell due while no peer was leader (misfire: {policy.value})",
                )
            )
        if missed.more:
            log.warning(
                "job %s: more than %d slots after %s were missed; only the first are recorded",
                job.id,
                MAX_MISSED_RECORDS,
                cursor,
            )
        for slot in to_run:
            self._decide(job, slot, Trigger.MISFIRE, run_id_for(job.id, slot), batch)
        if catchable or missed.items:
            batch.cursors[job.id] = max([*catchable, *missed.items])

    # -- triggers and housekeeping --------------------------------------------------
    def _take_triggers(self) -> None:
        requests = self._coordination.pending_triggers()
        if not requests:
            return
        jobs = self._config().jobs
        batch = self._new_batch(self._clock.now())
        for request in requests:
            job = jobs.get(request.job_id)
            by = request.requested_by or None
            if job is None:
                batch.records.append(
                    self._terminal(
                        request.job_id,
                        request.slot,
                        Trigger.MANUAL,
                        request.run_id,
                        RunState.FAILED,
                        batch.now,
                        f"job {request.job_id} is not defined",
                        by,
                    )
                )
            else:
                self._decide(job, request.slot, Trigger.MANUAL, request.run_id, batch, by)
        self._commit(batch)
        for request in requests:
            self._coordination.remove_trigger(request.run_id)

    def _maybe_reconcile(self) -> None:
        now = self._clock.now()
        if self._last_reconcile is not None and now - self._last_reconcile < RECONCILE_EVERY:
            return
        self._last_reconcile = now
        self._reconcile(now)

    def _reconcile(self, now: datetime) -> None:
        """Settle the active runs of peers that are gone (see the module's docstring).

        Only the records of active runs without a heartbeat are read: a run with one is
        running on a live session. The others are assigned and not started yet (the usual
        case: a few, recorded ahead of their slot), or their peer was lost."""
        ids = self._coordination.active_run_ids()
        heartbeats = self._coordination.executing_runs()
        unconfirmed = ids - heartbeats
        for run_id in self._active.keys() - ids:
            del self._active[run_id]
        for run_id in heartbeats & self._active.keys():  # a heartbeat says it is running
            if (known := self._active[run_id]).state is RunState.ASSIGNED:
                self._active[run_id] = known.replace(state=RunState.RUNNING)
        if not unconfirmed:
            return
        records = self._coordination.get_runs(sorted(unconfirmed))
        self._remember(records)
        live = [p.peer_id for p in self._coordination.peers()]
        # Read after the records: a run seen running and not executing has lost its peer.
        executing = self._coordination.executing_runs()
        load = Counter(r.peer_id for r in self._active.values() if r.peer_id)
        nodes = self._config().nodes
        self._move_overdue(records, live, now, load, nodes)
        for record in records:
            if record.state.terminal or record.peer_id is None:
                continue
            node = nodes.get(record.node_id or "")
            if record.state is RunState.ASSIGNED and record.peer_id not in live:
                target = executing_peer(node, record.run_id, live, load) if node else None
                self._reassign(record, target, now)
                if target is not None:
                    load[target] += 1
            elif record.state is RunState.RUNNING and record.run_id not in executing:
                target = None
                if record.at_least_once and node is not None:
                    target = executing_peer(node, record.run_id, live, load)
                settled = settle_abandoned(
                    self._coordination,
                    self._reports,
                    record,
                    now,
                    requeue_to=target,
                    why=f"peer {record.peer_id} was lost while the run was in progress",
                )
                if settled is not None:
                    self._remember([settled])

    def _move_overdue(
        self,
        records: list[RunRecord],
        live: list[str],
        now: datetime,
        load: Counter[str],
        nodes: Mapping[str, NodeSpec],
    ) -> None:
        """Suspect the live peers that hold overdue runs (see suspects.py), and move those
        runs to a peer that is not suspected (they stay where they are if every peer is
        suspected). Updates ``records`` in place with the moved runs, and ``load``."""
        since = self._coordination.reconnected_at()
        late = [r for r in records if r.peer_id in live and overdue(r, now, since=since)]
        if not late:
            return
        for peer in self._suspects.suspect({r.peer_id for r in late if r.peer_id}):
            log.warning(
                "peer %s has not started runs that were due over %.0f s ago: suspected of "
                "being stopped or cut off; it gets no runs for %.0f s",
                peer,
                OVERDUE.total_seconds(),
                HOLD_S,
            )
        late_ids = {r.run_id for r in late}
        eligible = self._suspects.unsuspected(live)
        if not eligible:
            return
        for i, record in enumerate(records):
            node = nodes.get(record.node_id or "")
            if record.run_id not in late_ids or node is None:
                continue
            target = executing_peer(node, record.run_id, eligible, load)
            if target is None or target == record.peer_id:
                continue
            moved = self._reassign(record, target, now, why="has not started it")
            if moved is not None:
                records[i] = moved
                load[target] += 1

    def _reassign(
        self, record: RunRecord, target: str | None, now: datetime, why: str = "is gone"
    ) -> RunRecord | None:
        """A run assigned to a peer that is gone (or has not started it) before it started it:
        move it, or fail it; the record moved (None if it was not, or failed)."""
        expect = {"state": RunState.ASSIGNED, "peer_id": record.peer_id}
        if target is not None:
            moved = self._coordination.update_run(record.run_id, expect=expect, peer_id=target)
            if moved is not None:
                self._remember([moved])
                log.warning(
                    "run %s: peer %s %s; reassigned to %s",
                    record.run_id,
                    record.peer_id,
                    why,
                    target,
                )
            return moved
        reason = f"peer {record.peer_id} is gone and no live peer can execute node {record.node_id}"
        failed = self._coordination.finish_run(
            record.run_id, RunState.FAILED, ended_at=now, reason=reason, expect=expect
        )
        if failed is not None:
            self._remember([failed])
        if failed is not None and failed.state is RunState.FAILED and failed.reason == reason:
            self._reports.write([RunReport.from_record(failed)])
            log.warning("run %s: failed (%s)", record.run_id, reason)
        return None

    def _maybe_prune(self) -> None:
        now = self._clock.now()
        due = self._last_prune is None or now - self._last_prune >= self._prune_every
        crowded = self._retention_count is not None and self._recorded >= max(
            1, self._retention_count // 2
        )
        if not (due or crowded) or (self._pruner is not None and self._pruner.is_alive()):
            return
        self._last_prune, self._recorded = now, 0
        if not self._threaded:
            self._prune(now - self._retention)
        else:
            # Pruning reads what it deletes: a big backlog takes seconds, off the schedule.
            self._pruner = threading.Thread(
                target=self._prune, args=(now - self._retention,), name="pruner", daemon=True
            )
            self._pruner.start()

    def _prune(self, finished_before: datetime) -> None:
        try:
            pruned = self._coordination.prune_runs(finished_before, keep=self._retention_count)
        except Exception as exc:
            if self._stop.is_set():  # stopping: the store may be closing under the pruner
                log.info("pruning stopped with the scheduler (%r); the next leader prunes", exc)
                return
            log.exception("pruning finished run records failed; the next prune retries")
            return
        if pruned:
            log.info(
                "pruned %d finished run records (older than %s, or beyond the newest %s)",
                pruned,
                self._retention,
                self._retention_count,
            )


def _waits_for_previous(job: JobSpec) -> bool:
    """A job whose due slot waits for its previous run instead of being skipped at once."""
    return job.concurrency == "forbid" and job.misfire.policy is MisfirePolicy.RUN_ALL


def _look_again(job: JobSpec, slot: datetime, now: datetime) -> datetime | None:
    """When to decide a slot that its job's active run blocks now; None: decide it now.

    A slot not yet due is decided at its instant (as the previous run is then). A due one
    is decided now (skipped or replacing), except under forbid and run_all: every slot was
    asked for, and the previous run is often active only because it started late (after a
    failover, the catch-up runs delay the next ones), so the slot waits for that run until
    its deadline, the job's next slot or the end of its misfire grace."""
    if slot > now:
        return slot
    if not _waits_for_previous(job):
        return None
    deadline = slot + job.misfire.grace
    with contextlib.suppress(NoSlotError):
        deadline = min(deadline, next_slot(job.schedule, job.id, slot))
    if now >= deadline:
        return None
    return min(deadline, now + HOLD_POLL)


def _next_or_none(job: JobSpec, after: datetime) -> datetime | None:
    try:
        return next_slot(job.schedule, job.id, after)
    except NoSlotError:
        log.warning("job %s: its schedule has no slot after %s", job.id, after)
        return None


@dataclass
class _Bounded:
    items: list[datetime]
    more: bool


def _bounded(slots: Iterable[datetime], limit: int) -> _Bounded:
    items: list[datetime] = []
    for slot in slots:
        if len(items) == limit:
            return _Bounded(items, True)
        items.append(slot)
    return _Bounded(items, False)
