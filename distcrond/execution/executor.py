"""The executor: runs the runs assigned to this peer, each on its own thread.

It learns of assignments from the coordination store (``watch_runs``), claims
each with a compare-and-set before starting anything (so a run starts at most
once, whatever the store replays), runs it through the node's runner with the
job's retries, writes the report, and then records the terminal state.

Runs arrive a little before their slots (scheduler.LOOKAHEAD). They are claimed
at most CLAIM_AHEAD before the slot (runs of the same instant in one write, where
the store can), and one thread, the starter, starts them at their instants: a
runner that spawns without blocking (local) is started by the starter itself, so
200 runs due at once are spawned one after the other by one thread instead of
by 200 threads competing for the interpreter. Such a run has no thread while it
runs: its end (a callback from the runner) hands it to the settler, one thread that
records the runs ending about together in one batch, or, when the run fails and the
job allows a retry, to a thread of the pool that retries it. A run whose runner
blocks (SSH) has a thread of the pool from its start.
The report is written before the state, so a peer that dies between the two
finds, on restart, a report that tells the run's real outcome.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from distcrond.clock import Clock
from distcrond.config.loader import LoadedConfig
from distcrond.config.models import ConnectionType, JobSpec, NodeSpec
from distcrond.coordination.base import (
    ClaimInterrupted,
    CoordinationStore,
    Finish,
    StoreUnavailable,
)
from distcrond.execution.base import Attempt, Runner, RunOutcome, RunRequest
from distcrond.execution.health import NodeHealthTracker
from distcrond.recovery import settle_abandoned
from distcrond.reporting.base import ReportStore
from distcrond.runs import RunRecord, RunReport, RunState, Trigger, format_slot
from distcrond.scheduling.placement import place

log = logging.getLogger("distcrond.executor")

# How long a finished run's report and state are retried while a store is unavailable.
SETTLE_PATIENCE = 300.0
# The leader assigns a slot's run a little before it is due (scheduler.LOOKAHEAD); the
# executor starts it at its instant. A run assigned further ahead than this (a clock
# far apart from the leader's) starts at once rather than waiting that long.
MAX_EARLY = 1.0
# A claim the store refused (a suspended session refuses at once, without a request) is
# tried again when its connection is back, or at most this long after a refusal.
CLAIM_RETRY_MAX = 0.25  # seconds
# A run is claimed at most this long before its instant, so that the claim's write is
# done when the instant comes. A peer that dies in between leaves the run claimed and
# never started: it ends "unknown" (or is re-run, when at_least_once), like a run
# whose peer died just after starting it.
CLAIM_AHEAD = 0.1
# Ended runs are settled once no start is due within START_FIRST seconds, or after
# SETTLE_DEFER seconds at the latest.
START_FIRST = 0.002
SETTLE_DEFER = 0.5
# A batch of settles waits this long first, so that the runs ending about together are
# written together: fewer, larger write transactions (ZooKeeper's costliest requests).
SETTLE_GATHER = 0.02
# The most runs the settler records in one batch.
SETTLE_MAX = 500


@dataclass(eq=False)
class _Flight:
    record: RunRecord
    start_at: datetime  # when to start it: its slot, or at once
    cancel: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str = ""
    cancelled_by: str | None = None  # who asked (an API token's name), for the report
    claimed: RunRecord | None = None


@dataclass(frozen=True)
class _Ended:
    """A run to record: its report, and whether it ran (for the log line)."""

    report: RunReport
    ran: bool


_order = itertools.count()


class Executor:
    """Runs this peer's assigned runs. ``start()`` once, ``stop()`` once."""

    def __init__(
        self,
        coordination: CoordinationStore,
        reports: ReportStore,
        runners: Mapping[str, Runner],
        config: Callable[[], LoadedConfig],
        peer_id: str,
        clock: Clock,
        max_concurrent_runs: int = 256,
        health: NodeHealthTracker | None = None,
        claim_ahead: float = CLAIM_AHEAD,
    ) -> None:
        self._coordination = coordination
        self._reports = reports
        self._runners = runners
        self._config = config
        self._peer_id = peer_id
        self._clock = clock
        self._health = health
        self._claim_ahead = timedelta(seconds=claim_ahead)
        self._pool = ThreadPoolExecutor(max_concurrent_runs, thread_name_prefix="run")
        # The starter's heaps of (instant, order, flight): to claim, and claimed to start.
        self._unclaimed: list[tuple[datetime, int, _Flight]] = []
        self._ready: list[tuple[datetime, int, _Flight]] = []
        self._starter_wake = threading.Event()
        self._claiming = 0  # claim batches on the pool, not done yet
        self._never = threading.Event()  # waited on, to sleep
        self._starter = threading.Thread(target=self._start_loop, name="run-starter", daemon=True)
        # Runs ending together are settled together, by the settler: their reports in one
        # write (one transaction, one bulk), then their states in one finish_runs; and only
        # once no start is due.
        self._to_settle: list[_Ended] = []
        self._settle_wake = threading.Condition()
        self._settler_stop = False
        self._settler = threading.Thread(target=self._settle_loop, name="run-settler", daemon=True)
        self._ending = 0  # runs the starter spawned whose first attempt has not ended
        self._starting = False  # the starter is starting runs
        self._lock = threading.Lock()
        self._inflight: dict[str, _Flight] = {}
        self._idle = threading.Condition(self._lock)
        self._stopping = False

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        """Settle the runs this peer left running when it last stopped, then take assignments.
        (The runs of other peers that are gone are the leader's to settle.)"""
        self._recover()
        self._settler.start()
        self._starter.start()
        self._coordination.watch_runs(self._peer_id, self._on_run)

    def stop(self, grace: float) -> None:
        """Stop taking runs; wait up to ``grace`` seconds for running ones, then cancel them."""
        with self._lock:
            self._stopping = True
            deadline = self._clock.monotonic() + grace
            while self._inflight and self._clock.monotonic() < deadline:
                self._idle.wait(min(0.1, max(0.0, deadline - self._clock.monotonic())))
            for flight in self._inflight.values():
                flight.cancel_reason = f"interrupted: peer {self._peer_id} is shutting down"
                flight.cancel.set()
        self._starter_wake.set()
        if self._starter.is_alive():
            self._starter.join()
        self._pool.shutdown(wait=True, cancel_futures=True)
        # The runs the starter spawned end through their runner (cancelled above, when still
        # going): the settler records them, then stops.
        with self._lock:
            while self._ending:
                self._idle.wait()
        with self._settle_wake:
            self._settler_stop = True
            self._settle_wake.notify()
        if self._settler.is_alive():
            self._settler.join()

    def in_flight(self) -> int:
        with self._lock:
            return len(self._inflight)

    # -- assignments -----------------------------------------------------------
    def _on_run(self, record: RunRecord) -> None:
        if record.cancel_requested:
            self._on_cancel(record)
            return
        with self._lock:
            if record.run_id in self._inflight or not self._takes(record):
                return
            now = self._clock.now()
            early = (record.slot - now).total_seconds()
            start_at = (
                record.slot
                if record.trigger is not Trigger.MANUAL and 0 < early <= MAX_EARLY
                else now
            )
            flight = self._inflight[record.run_id] = _Flight(record, start_at)
            heapq.heappush(self._unclaimed, (start_at, next(_order), flight))
        self._starter_wake.set()

    def _takes(self, record: RunRecord) -> bool:
        """Whether this peer takes ``record``: assigned to it, not claimed yet, and this
        peer not stopping (caller holds the lock)."""
        return (
            not self._stopping
            and record.state is RunState.ASSIGNED
            and record.peer_id == self._peer_id
        )

    def _on_cancel(self, record: RunRecord) -> None:
        """A cancel requested for a run of this peer: a run it holds ends like a timeout
        (its starter sees it due at once); one that reached it already cancelled (not
        started yet, or moved after its peer was lost) is finished without running."""
        with self._lock:
            flight = self._inflight.get(record.run_id)
            if flight is not None:
                if not flight.cancel.is_set():
                    flight.cancel_reason = cancel_reason(record)
                    flight.cancelled_by = record.cancelled_by
                    flight.cancel.set()
                    self._starter_wake.set()
                return
            if not self._takes(record):
                return
            # Its flight, ended from the start, makes a repeated event a no-op until the
            # settler lets it go.
            ended = self._inflight[record.run_id] = _Flight(record, self._clock.now())
            ended.cancel.set()
        self._finish_without_running(record, RunState.FAILED, cancel_reason(record))

    def _done(self, run_id: str) -> None:
        with self._lock:
            self._inflight.pop(run_id, None)
            if not self._inflight:
                self._idle.notify_all()

    # -- the starter -------------------------------------------------------------
    def _start_loop(self) -> None:
        """Claim runs as their instants near, and start them at their instants."""
        ahead = self._claim_ahead
        while True:
            self._starter_wake.clear()
            with self._lock:
                now = self._clock.now()
                stopping = self._stopping
                to_claim: list[_Flight] = []
                while self._unclaimed and (stopping or self._unclaimed[0][0] - ahead <= now):
                    to_claim.append(heapq.heappop(self._unclaimed)[2])
                due: list[_Flight] = []
                while self._ready and self._ready[0][0] <= now:
                    due.append(heapq.heappop(self._ready)[2])
                if any(item[2].cancel.is_set() for item in self._ready):
                    # Cancelled (replaced, or this peer stops): due at once, to end cancelled.
                    due += [f for _, _, f in self._ready if f.cancel.is_set()]
                    self._ready = [item for item in self._ready if not item[2].cancel.is_set()]
                    heapq.heapify(self._ready)
                instants = [self._unclaimed[0][0] - ahead] if self._unclaimed else []
                instants += [self._ready[0][0]] if self._ready else []
            if stopping:
                for flight in to_claim:  # unclaimed, it stays assigned, for a later start
                    self._done(flight.record.run_id)
            else:
                self._claim_soon(to_claim)
            if due:
                self._starting = True
                with contextlib.ExitStack() as starting:
                    for runner in self._runners.values():
                        starting.enter_context(runner.starting())
                    started = [self._start(flight) for flight in due]
                # Followed after the batch, not between two spawns.
                for flight, checked, first in started:
                    if first is not None and len(checked) == 3:
                        self._follow(flight, checked, first)
                    else:
                        self._pool.submit(self._execute, flight, checked, first)
                self._starting = False
            with self._lock:
                if stopping and not (self._ready or self._unclaimed or self._claiming):
                    return
            wait = min([1.0, *((at - now).total_seconds() for at in instants)])
            self._clock.wait(self._starter_wake, wait if not stopping else min(wait, 0.05))

    def _claim_soon(self, flights: list[_Flight]) -> None:
        """Claim on the pool: the runs that arrived together in one write, where the store
        can; else each on its own (their writes then overlap). The store records a run
        claimed ahead of its slot as started at its slot."""
        if not flights:
            return
        now = self._clock.now()
        batches = [flights] if self._coordination.claims_in_batches else [[f] for f in flights]
        for batch in batches:
            with self._lock:
                self._claiming += 1
            try:
                self._pool.submit(self._claim, batch, now)
            except RuntimeError:  # the pool is shutting down: the runs stay assigned
                for flight in batch:
                    self._done(flight.record.run_id)
                with self._lock:
                    self._claiming -= 1

    def _claim(self, flights: list[_Flight], started_at: datetime) -> None:
        """Claim the runs; while the store refuses (a suspended session starts nothing),
        retry until it answers or this peer stops. The assignment is delivered once:
        giving up here would strand it on a live peer. A run that cannot be claimed
        (claimed before, finished, not ours) never starts."""
        try:
            delay = 0.1
            ids = [f.record.run_id for f in flights]
            claimed: dict[str, RunRecord] = {}
            while True:
                try:
                    claimed.update(self._coordination.claim_runs(ids, self._peer_id, started_at))
                    break
                except StoreUnavailable as e:
                    if isinstance(e, ClaimInterrupted):  # those are ours: retry the others
                        claimed.update(e.claimed)
                        ids = [run_id for run_id in ids if run_id not in claimed]
                    log.warning("runs %s: cannot claim them yet (%s); retrying", ", ".join(ids), e)
                except Exception:
                    log.exception("runs %s: claiming failed", ", ".join(ids))
                    break
                if self._stopping:
                    break  # the runs not claimed stay assigned, for a later start
                self._pause_for_store(delay)
                if self._stopping:
                    break
                delay = min(delay * 2, CLAIM_RETRY_MAX)
            with self._lock:
                for flight in flights:
                    record = claimed.get(flight.record.run_id)
                    if record is not None:
                        flight.claimed = record
                        heapq.heappush(self._ready, (flight.start_at, next(_order), flight))
            for flight in flights:
                if flight.claimed is None:
                    self._done(flight.record.run_id)
        finally:
            with self._lock:
                self._claiming -= 1
            self._starter_wake.set()

    def _start(
        self, flight: _Flight
    ) -> tuple[_Flight, tuple[JobSpec, NodeSpec, Runner] | tuple[RunState, str], Attempt | None]:
        """Start a claimed run at its instant: spawn it here when its runner does not block.
        The rest (waiting, retries, settling) is for a thread of the pool: what it needs."""
        record = flight.claimed
        assert record is not None
        checked = self._check_claimed(record)  # once: a run started is not missed later
        first: Attempt | None = None
        if len(checked) == 3 and checked[2].starts_without_blocking:
            job, node, runner = checked
            started_at = self._clock.now()
            try:
                first = runner.start(self._request(record, job, node, 1, flight))
            except Exception as e:  # it may have started: it is not started again
                log.exception("run %s: starting it failed", record.run_id)
                first = Attempt.ended(
                    RunOutcome(
                        ok=False,
                        exit_code=None,
                        started_at=started_at,
                        ended_at=self._clock.now(),
                        reason=f"starting it failed: {e!r}",
                    )
                )
        return flight, checked, first

    def _execute(
        self,
        flight: _Flight,
        checked: tuple[JobSpec, NodeSpec, Runner] | tuple[RunState, str],
        first: Attempt | None,
    ) -> None:
        record = flight.claimed
        assert record is not None
        try:
            self._run_claimed(record, flight, checked, first)  # ends by handing it to the settler
        except Exception:
            log.exception("run %s: executor error", record.run_id)
            self._done(record.run_id)

    def _follow(
        self, flight: _Flight, checked: tuple[JobSpec, NodeSpec, Runner], first: Attempt
    ) -> None:
        """A run the starter spawned has no thread while it runs: its end hands it over."""
        with self._lock:
            self._ending += 1
        first.when_ended(lambda outcome: self._first_ended(flight, checked, outcome))

    def _first_ended(
        self, flight: _Flight, checked: tuple[JobSpec, NodeSpec, Runner], outcome: RunOutcome
    ) -> None:
        """Called by the runner (its supervisor thread) when a spawned run ends: to the
        settler, or to a thread of the pool when the job allows a retry."""
        record = flight.claimed
        assert record is not None
        job, node, _runner = checked
        try:
            if not (outcome.ok or outcome.cancelled or job.retries.count == 0):
                try:
                    self._pool.submit(self._execute, flight, checked, Attempt.ended(outcome))
                    return
                except RuntimeError:  # this peer is stopping: the outcome is the run's
                    pass
            self._note_health(node, outcome)
            self._settle(self._report(record, flight, node, outcome, 1, outcome.started_at))
        except Exception:
            log.exception("run %s: executor error", record.run_id)
            self._done(record.run_id)
        finally:
            with self._lock:
                self._ending -= 1
                if not self._ending:
                    self._idle.notify_all()

    def _check_claimed(
        self, record: RunRecord
    ) -> tuple[JobSpec, NodeSpec, Runner] | tuple[RunState, str]:
        """The job, node and runner of a claimed run, or how it ends without starting."""
        config = self._config()
        job = config.jobs.get(record.job_id)
        node = config.nodes.get(record.node_id or "")
        if job is None:
            return RunState.FAILED, f"job {record.job_id} is no longer defined"
        if node is None:
            return RunState.FAILED, f"node {record.node_id} is no longer defined"
        runner = self._runners.get(node.connection_type.value)
        if runner is None:
            return RunState.FAILED, f"no runner for connection_type {node.connection_type.value}"
        late = self._clock.now() - record.slot
        if record.trigger is not Trigger.MANUAL and late > job.misfire.grace:
            return RunState.MISSED, f"not started within the misfire grace ({late} late)"
        return job, node, runner

    def _run_claimed(
        self,
        record: RunRecord,
        flight: _Flight,
        checked: tuple[JobSpec, NodeSpec, Runner] | tuple[RunState, str],
        first: Attempt | None,
    ) -> None:
        if len(checked) == 2:
            self._finish_without_running(record, *checked)
            return
        job, node, runner = checked
        outcome, attempts, started_at, node = self._attempts(
            record, job, node, runner, flight, first
        )
        self._settle(self._report(record, flight, node, outcome, attempts, started_at))

    def _report(
        self,
        record: RunRecord,
        flight: _Flight,
        node: NodeSpec,
        outcome: RunOutcome,
        attempts: int,
        started_at: datetime,
    ) -> RunReport:
        state = RunState.SUCCEEDED if outcome.ok else RunState.FAILED
        reason = (
            flight.cancel_reason if outcome.cancelled and flight.cancel_reason else outcome.reason
        )
        return RunReport(
            run_id=record.run_id,
            job_id=record.job_id,
            slot=record.slot,
            state=state,
            node_id=node.id,
            peer_id=self._peer_id,
            trigger=record.trigger,
            attempts=attempts,
            started_at=started_at,
            ended_at=outcome.ended_at,
            exit_code=outcome.exit_code,
            reason=reason,
            stdout=outcome.stdout,
            stderr=outcome.stderr,
            output_truncated=outcome.output_truncated,
            triggered_by=record.triggered_by,
            cancelled_by=flight.cancelled_by if outcome.cancelled else None,
        )

    def _attempts(
        self,
        record: RunRecord,
        job: JobSpec,
        node: NodeSpec,
        runner: Runner,
        flight: _Flight,
        first: Attempt | None,
    ) -> tuple[RunOutcome, int, datetime, NodeSpec]:
        """Run the first attempt and the retries the job allows; the last outcome counts.

        An attempt that could not reach its node (``not_started``) marks the node
        unhealthy, and a ``hosts: any`` run's next attempt goes, at once, to another
        node this peer can execute, if there is one; else it waits the backoff.
        """
        attempts = 1 + job.retries.count
        started_at: datetime | None = None
        attempt = 1
        tried = {node.id}
        while True:
            if first is not None:  # the starter started the first attempt
                outcome, first = first.wait(), None
            else:
                outcome = runner.run(self._request(record, job, node, attempt, flight))
            if started_at is None:
                started_at = outcome.started_at
            self._note_health(node, outcome)
            if outcome.ok or outcome.cancelled or attempt >= attempts:
                return outcome, attempt, started_at, node
            attempt += 1
            other = self._other_node(job, record, tried) if outcome.not_started else None
            if other is not None:
                log.warning(
                    "run %s: %s; attempt %d moves to node %s",
                    record.run_id,
                    outcome.reason,
                    attempt,
                    other.id,
                )
                node, runner = other, self._runners[other.connection_type.value]
                tried.add(node.id)
                self._coordination.update_run(record.run_id, attempt=attempt, node_id=node.id)
                continue
            delay = retry_delay(job, attempt - 1)
            log.info(
                "run %s: attempt %d failed (%s); retrying in %s",
                record.run_id,
                attempt - 1,
                outcome.reason,
                delay,
            )
            if flight.cancel.wait(delay.total_seconds()):
                return outcome, attempt - 1, started_at, node
            self._coordination.update_run(record.run_id, attempt=attempt)

    def _note_health(self, node: NodeSpec, outcome: RunOutcome) -> None:
        if self._health is None or node.connection_type is not ConnectionType.SSH:
            return
        try:
            if outcome.not_started and not outcome.cancelled:
                self._health.failed(node.id, outcome.reason)
            elif not outcome.not_started:
                self._health.succeeded(node.id)
        except StoreUnavailable as e:
            log.warning("node %s: cannot record its health: %s", node.id, e)

    def _other_node(self, job: JobSpec, record: RunRecord, tried: set[str]) -> NodeSpec | None:
        """For a ``hosts: any`` run: a healthy node of the job that this peer can execute."""
        if job.policy.hosts not in ("any", 1):
            return None
        nodes = {k: v for k, v in self._config().nodes.items() if k not in tried}
        unhealthy = self._health.unhealthy() if self._health is not None else set()
        placement = place(
            job, record.run_id, nodes, [self._peer_id], {}, {}, self._runners.keys(), unhealthy
        )
        if not placement.assignments:
            return None
        return nodes[placement.assignments[0].node_id]

    def _request(
        self, record: RunRecord, job: JobSpec, node: NodeSpec, attempt: int, flight: _Flight
    ) -> RunRequest:
        env = dict(job.env)
        env.update(
            DISTCRON_JOB=job.id,
            DISTCRON_RUN_ID=record.run_id,
            DISTCRON_SLOT=format_slot(record.slot),
            DISTCRON_NODE=node.id,
            DISTCRON_PEER=self._peer_id,
            DISTCRON_ATTEMPT=str(attempt),
            DISTCRON_TRIGGER=record.trigger.value,
        )
        return RunRequest(
            run_id=record.run_id,
            job_id=job.id,
            node_id=node.id,
            peer_id=self._peer_id,
            slot=record.slot,
            argv=job.argv,
            env=env,
            working_dir=job.working_dir,
            timeout=job.timeout,
            max_output_bytes=job.max_output_bytes,
            cancel=flight.cancel,
            node=node,
        )

    def _finish_without_running(self, record: RunRecord, state: RunState, reason: str) -> None:
        now = self._clock.now()
        report = RunReport.from_record(
            record, state=state, peer_id=self._peer_id, ended_at=now, reason=reason
        )
        self._settle(report, ran=False)

    # -- the settler -------------------------------------------------------------
    def _settle(self, report: RunReport, ran: bool = True) -> None:
        """Hand an ended run to the settler, which records it and then lets it go."""
        with self._settle_wake:
            self._to_settle.append(_Ended(report, ran))
            self._settle_wake.notify()

    def _settle_loop(self) -> None:
        """Record the ended runs in batches, until stop() has no more of them."""
        while True:
            with self._settle_wake:
                while not self._to_settle and not self._settler_stop:
                    self._settle_wake.wait()
                if not self._to_settle:
                    return
            self._yield_to_starts()
            with self._settle_wake:
                batch = self._to_settle[:SETTLE_MAX]
                del self._to_settle[:SETTLE_MAX]
            self._record(batch)

    def _record(self, batch: list[_Ended]) -> None:
        """The reports first, then the terminal states (a state never lacks its report),
        retried through a store outage: a run that ran must be reported, and its record
        must not stay active. Then each run's log line, and the run is let go."""
        reports = [ended.report for ended in batch]
        ids = ", ".join(report.run_id for report in reports)
        delay = 0.1
        deadline = self._clock.monotonic() + SETTLE_PATIENCE
        recorded = False
        while not recorded:
            try:
                self._reports.write(reports)
                self._coordination.finish_runs([self._finish_of(report) for report in reports])
                recorded = True
            except StoreUnavailable as e:
                if self._clock.monotonic() > deadline:
                    log.error("runs %s: their outcomes could not be recorded: %s", ids, e)
                    break
                log.warning("runs %s: cannot record their outcomes yet (%s); retrying", ids, e)
                self._pause_for_store(delay)
                delay = min(delay * 2, 5.0)
            except Exception:
                log.exception("runs %s: recording their outcomes failed", ids)
                break
        for ended in batch:
            if recorded:
                _log_ended(ended)
            self._done(ended.report.run_id)

    def _pause_for_store(self, delay: float) -> None:
        """Wait before trying the coordination store again: while its connection is
        away, until it is back (at most ``delay``), so that what waited on it goes out
        as the ensemble serves again, not at the next step of a back-off (which made
        runs claimed during a ZooKeeper server's loss start up to 0.25 s late); while
        it is up (the refusal had another cause), ``delay``."""
        if self._coordination.wait_connected(0):
            self._clock.wait(self._never, delay)
        else:
            self._coordination.wait_connected(delay)

    def _finish_of(self, report: RunReport) -> Finish:
        return Finish(
            report.run_id,
            report.state,
            report.ended_at or self._clock.now(),
            report.exit_code,
            report.reason,
        )

    def _yield_to_starts(self) -> None:
        """Settling can wait; starting cannot. First gather the runs ending meanwhile
        (SETTLE_GATHER); then, while runs are being started or are due to start within
        START_FIRST, wait (at most SETTLE_DEFER), so that a burst of starts does not share
        the interpreter and the CPUs with the bookkeeping of ended runs."""
        self._clock.wait(self._never, SETTLE_GATHER)
        deadline = self._clock.monotonic() + SETTLE_DEFER
        soon = timedelta(seconds=START_FIRST)
        while self._clock.monotonic() < deadline:
            with self._lock:
                now = self._clock.now()
                # (A start already overdue is the starter's to make: it is busy, or about
                # to be, and ``_starting`` says so; waiting on it would only add delay.)
                due = bool(self._ready) and now <= self._ready[0][0] <= now + soon
            if not (due or self._starting):
                return
            self._clock.wait(self._never, START_FIRST)

    # -- recovery --------------------------------------------------------------
    def _recover(self) -> None:
        """Runs still ``running`` on this peer id were left by its previous process."""
        for record in self._coordination.runs(peer_id=self._peer_id, states=[RunState.RUNNING]):
            settle_abandoned(
                self._coordination,
                self._reports,
                record,
                self._clock.now(),
                requeue_to=self._peer_id,
                why=f"peer {self._peer_id} stopped while the run was in progress",
            )


def cancel_reason(record: RunRecord) -> str:
    """Why a run whose cancel was requested ended: who asked, or the run replacing it."""
    if record.cancelled_by:
        return f"cancelled by {record.cancelled_by}"
    return "cancelled: replaced by a newer run (concurrency: replace)"


def retry_delay(job: JobSpec, attempt: int) -> timedelta:
    """The wait before attempt ``attempt + 1``: backoff doubled each time, capped."""
    return min(job.retries.backoff * 2 ** (attempt - 1), job.retries.max_backoff)


def _log_ended(ended: _Ended) -> None:
    report = ended.report
    if not ended.ran:
        log.warning("run %s: %s (%s)", report.run_id, report.state.value, report.reason)
        return
    log.info(
        "run %s on %s: %s%s",
        report.run_id,
        report.node_id,
        report.state.value,
        f" ({report.reason})" if report.reason else "",
        extra={"run_id": report.run_id, "state": report.state.value, "exit_code": report.exit_code},
    )
