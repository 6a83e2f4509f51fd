"""The executor: runs the runs assigned to this peer, each on its own thread.

It learns of assignments from the coordination store (``watch_runs``), claims
each with a compare-and-set before starting anything (so a run starts at most
once, whatever the store replays), runs it through the node's runner with the
job's retries, writes the report, and then records the terminal state.
The report is written before the state, so a peer that dies between the two
finds, on restart, a report that tells the run's real outcome.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from distcrond.batching import Combiner
from distcrond.clock import Clock
from distcrond.config.loader import LoadedConfig
from distcrond.config.models import ConnectionType, JobSpec, NodeSpec
from distcrond.coordination.base import CoordinationStore, StoreUnavailable
from distcrond.execution.base import Runner, RunOutcome, RunRequest
from distcrond.execution.health import NodeHealthTracker
from distcrond.recovery import settle_abandoned
from distcrond.reporting.base import ReportStore
from distcrond.runs import RunRecord, RunReport, RunState, Trigger, format_slot
from distcrond.scheduling.placement import place

log = logging.getLogger("distcrond.executor")

# How long a finished run's report and state are retried while a store is unavailable.
SETTLE_PATIENCE = 300.0
# The leader assigns a slot's run a little before it is due (scheduler.LOOKAHEAD); the
# executor claims and starts it at its instant. A run assigned further ahead than this
# (a clock far apart from the leader's) starts at once rather than waiting that long.
MAX_EARLY = 1.0


@dataclass
class _Flight:
    record: RunRecord
    cancel: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str = ""


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
    ) -> None:
        self._coordination = coordination
        self._reports = reports
        self._runners = runners
        self._config = config
        self._peer_id = peer_id
        self._clock = clock
        self._health = health
        self._pool = ThreadPoolExecutor(max_concurrent_runs, thread_name_prefix="run")
        # Runs due together claim together: one write for the batch, where the store can.
        self._claims: Combiner[str, None, RunRecord] | None = None
        if coordination.claims_in_batches:
            self._claims = Combiner(
                lambda items: coordination.claim_runs(
                    [run_id for run_id, _ in items], peer_id, self._clock.now()
                )
            )
        # Reports of runs ending together are written together (one transaction, one bulk).
        self._report_writes: Combiner[str, RunReport, bool] = Combiner(self._write_reports)
        self._lock = threading.Lock()
        self._inflight: dict[str, _Flight] = {}
        self._idle = threading.Condition(self._lock)
        self._stopping = False

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        """Settle the runs this peer left running when it last stopped, then take assignments.
        (The runs of other peers that are gone are the leader's to settle.)"""
        self._recover()
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
        self._pool.shutdown(wait=True, cancel_futures=True)

    def in_flight(self) -> int:
        with self._lock:
            return len(self._inflight)

    # -- assignments -----------------------------------------------------------
    def _on_run(self, record: RunRecord) -> None:
        with self._lock:
            flight = self._inflight.get(record.run_id)
            if record.cancel_requested:
                if flight is not None and not flight.cancel.is_set():
                    flight.cancel_reason = (
                        "cancelled: replaced by a newer run (concurrency: replace)"
                    )
                    flight.cancel.set()
                return
            if (
                flight is not None
                or self._stopping
                or record.state is not RunState.ASSIGNED
                or record.peer_id != self._peer_id
            ):
                return
            flight = self._inflight[record.run_id] = _Flight(record)
        try:
            self._pool.submit(self._execute, flight)
        except RuntimeError:  # the pool is shutting down: the run stays assigned
            self._done(record.run_id)

    def _done(self, run_id: str) -> None:
        with self._lock:
            self._inflight.pop(run_id, None)
            if not self._inflight:
                self._idle.notify_all()

    def _execute(self, flight: _Flight) -> None:
        record = flight.record
        try:
            if not self._wait_for_slot(flight):
                return  # stopping: the run stays assigned, for this peer's next start or another
            claimed = self._claim(flight)
            if claimed is None:
                return  # claimed before, finished, not ours, or we stop: it never starts twice
            self._run_claimed(claimed, flight)
        except Exception:
            log.exception("run %s: executor error", record.run_id)
        finally:
            self._done(record.run_id)

    def _wait_for_slot(self, flight: _Flight) -> bool:
        """Wait until the run's slot (if it is at most MAX_EARLY ahead); False if this peer
        stops meanwhile. A run is claimed at its instant: until then it is only assigned,
        and a peer that dies before the slot leaves it for the leader to move."""
        record = flight.record
        if record.trigger is Trigger.MANUAL:
            return True
        while True:
            early = (record.slot - self._clock.now()).total_seconds()
            if early <= 0 or early > MAX_EARLY:
                return True
            if self._stopping:
                return False
            if self._clock.wait(flight.cancel, early):
                # Cancelled (replaced) before its slot: it goes on to be claimed and ends
                # "cancelled" without starting, unless this peer is stopping.
                return not self._stopping

    def _claim(self, flight: _Flight) -> RunRecord | None:
        """Claim the run; while the store refuses (a suspended session starts nothing), retry
        until it answers, the run is no longer ours to claim, or this peer stops. The
        assignment is delivered once: giving up here would strand it on a live peer."""
        delay = 0.1
        while True:
            try:
                if self._claims is not None:
                    return self._claims.submit(flight.record.run_id, None)
                return self._coordination.claim_run(
                    flight.record.run_id, self._peer_id, self._clock.now()
                )
            except StoreUnavailable as e:
                log.warning("run %s: cannot claim it yet (%s); retrying", flight.record.run_id, e)
            if self._stopping or flight.cancel.wait(delay):
                return None
            delay = min(delay * 2, 2.0)

    def _run_claimed(self, record: RunRecord, flight: _Flight) -> None:
        config = self._config()
        job = config.jobs.get(record.job_id)
        node = config.nodes.get(record.node_id or "")
        if job is None:
            self._finish_without_running(
                record, RunState.FAILED, f"job {record.job_id} is no longer defined"
            )
            return
        if node is None:
            self._finish_without_running(
                record, RunState.FAILED, f"node {record.node_id} is no longer defined"
            )
            return
        runner = self._runners.get(node.connection_type.value)
        if runner is None:
            self._finish_without_running(
                record,
                RunState.FAILED,
                f"no runner for connection_type {node.connection_type.value}",
            )
            return
        late = self._clock.now() - record.slot
        if record.trigger is not Trigger.MANUAL and late > job.misfire.grace:
            self._finish_without_running(
                record, RunState.MISSED, f"not started within the misfire grace ({late} late)"
            )
            return
        outcome, attempts, started_at, node = self._attempts(record, job, node, runner, flight)
        state = RunState.SUCCEEDED if outcome.ok else RunState.FAILED
        reason = (
            flight.cancel_reason if outcome.cancelled and flight.cancel_reason else outcome.reason
        )
        report = RunReport(
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
        )
        self._settle(report)
        log.info(
            "run %s on %s: %s%s",
            record.run_id,
            node.id,
            state.value,
            f" ({reason})" if reason else "",
            extra={"run_id": record.run_id, "state": state.value, "exit_code": outcome.exit_code},
        )

    def _attempts(
        self, record: RunRecord, job: JobSpec, node: NodeSpec, runner: Runner, flight: _Flight
    ) -> tuple[RunOutcome, int, datetime, NodeSpec]:
        """Run the first attempt and the retries the job allows; the last outcome counts.

        An attempt that could not reach its node (``not_started``) marks the node
        unhealthy, and a ``hosts: any`` run's next attempt goes, at once, to another
        node this peer can execute, if there is one; else it waits the backoff.
        """
        attempts = 1 + job.retries.count
        started_at = record.started_at or self._clock.now()
        attempt = 1
        tried = {node.id}
        while True:
            outcome = runner.run(self._request(record, job, node, attempt, flight))
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
        self._settle(report)
        log.warning("run %s: %s (%s)", record.run_id, state.value, reason)

    def _settle(self, report: RunReport) -> None:
        """Write the report, then the terminal state, retrying through a store outage:
        a run that ran must be reported, and its record must not stay active."""
        delay = 0.1
        deadline = self._clock.monotonic() + SETTLE_PATIENCE
        while True:
            try:
                self._report_writes.submit(report.run_id, report)
                self._coordination.finish_run(
                    report.run_id,
                    report.state,
                    ended_at=report.ended_at or self._clock.now(),
                    exit_code=report.exit_code,
                    reason=report.reason,
                )
                return
            except StoreUnavailable as e:
                if self._clock.monotonic() > deadline:
                    log.error("run %s: its outcome could not be recorded: %s", report.run_id, e)
                    raise
                log.warning(
                    "run %s: cannot record its outcome yet (%s); retrying", report.run_id, e
                )
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _write_reports(self, items: Sequence[tuple[str, RunReport]]) -> dict[str, bool]:
        self._reports.write([report for _, report in items])
        return {run_id: True for run_id, _ in items}

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


def retry_delay(job: JobSpec, attempt: int) -> timedelta:
    """The wait before attempt ``attempt + 1``: backoff doubled each time, capped."""
    return min(job.retries.backoff * 2 ** (attempt - 1), job.retries.max_backoff)
