"""The coordination store: one small interface, one module per backend.

The embedded backend (``sqlite.py``) serves a cluster of one; the ZooKeeper
backend serves a real cluster. Both pass ``tests/contract/test_coordination.py``.

Promises every backend keeps:

* ``record_runs`` is the run lock and the fence: it writes all of its records
  and cursors, or nothing; a run id that exists already is never written again
  (and is left out of the returned list); and it raises :class:`FencedOut`
  when ``epoch`` is no longer the current leader's, writing nothing.
* ``claim_run`` is a compare-and-set from ``assigned`` to ``running`` for the
  assigned peer: of any number of concurrent claims, at most one succeeds.
* Every write is idempotent: repeating it after a lost reply changes nothing.
* ``update_run`` and ``finish_run`` take ``expect`` (field -> value): the change
  is made only if the record still has those values, in the same
  compare-and-set, so that a decision taken on a read cannot apply to a run
  that changed meanwhile.
* ``executing_runs`` is liveness: a run claimed by a peer whose session (or
  process) has ended is ``running`` in its record but not in that set.
* Watch callbacks, and the leadership listener's methods, run on a thread of the
  store's and must not block: a listener hands the transition on and returns.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from distcrond.runs import RunRecord, RunState


class FencedOut(Exception):
    """A write was refused because its epoch is not the current leader's."""


class StoreUnavailable(Exception):
    """The store cannot be reached now (network, session suspended...)."""


class ClaimInterrupted(StoreUnavailable):
    """claim_runs lost the store part-way: ``claimed`` were claimed (they are the
    caller's to run), the others were not, and may be claimed again later."""

    def __init__(self, cause: StoreUnavailable, claimed: dict[str, RunRecord]) -> None:
        super().__init__(str(cause))
        self.claimed = claimed


@dataclass(frozen=True)
class StoreStatus:
    ok: bool
    backend: str
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "backend": self.backend, "detail": self.detail}


@dataclass(frozen=True)
class PeerInfo:
    """What a peer publishes about itself while it is alive."""

    peer_id: str
    api_url: str
    started_at: datetime
    version: str
    roles: tuple[str, ...] = ()
    config_digest: str = ""
    pid: int = 0
    host: str = ""

    def to_json(self) -> dict[str, Any]:
        from distcrond.runs import format_slot

        return {
            "peer_id": self.peer_id,
            "api_url": self.api_url,
            "started_at": format_slot(self.started_at),
            "version": self.version,
            "roles": list(self.roles),
            "config_digest": self.config_digest,
            "pid": self.pid,
            "host": self.host,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PeerInfo:
        from distcrond.runs import parse_slot

        return cls(
            peer_id=data["peer_id"],
            api_url=data.get("api_url", ""),
            started_at=parse_slot(data["started_at"]),
            version=data.get("version", ""),
            roles=tuple(data.get("roles", ())),
            config_digest=data.get("config_digest", ""),
            pid=int(data.get("pid", 0)),
            host=data.get("host", ""),
        )


@dataclass(frozen=True)
class LeaderInfo:
    """The current leader; ``since``: when it took its epoch (ZooKeeper: by the ensemble's
    clock)."""

    peer_id: str
    epoch: int
    since: datetime


@dataclass(frozen=True)
class SchedulerPass:
    """The newest completed pass of a leader's scheduler, as the leader published it.

    ``at`` is when that pass ended: published as the leader's wall clock, read back from
    ZooKeeper on the ensemble's clock (the write's time less ``published_after``, the
    seconds from the pass to its publication on the leader's monotonic clock), so that
    a leader whose wall clock is off does not make every peer misjudge its age.
    ``stall_timeout`` is the leader's ``--leader-stall-timeout``: past it without a
    pass, the leader abdicates."""

    peer_id: str
    epoch: int
    at: datetime
    stall_timeout: float
    published_after: float = 0.0

    def to_json(self) -> dict[str, Any]:
        from distcrond.runs import format_slot

        return {
            "peer_id": self.peer_id,
            "epoch": self.epoch,
            "at": format_slot(self.at),
            "stall_timeout": self.stall_timeout,
            "published_after": self.published_after,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SchedulerPass:
        from distcrond.runs import parse_slot

        return cls(
            peer_id=data["peer_id"],
            epoch=int(data["epoch"]),
            at=parse_slot(data["at"]),
            stall_timeout=float(data["stall_timeout"]),
            published_after=float(data.get("published_after", 0.0)),
        )


@dataclass(frozen=True)
class TriggerRequest:
    """A manual "run now", written by any peer's API and consumed by the leader."""

    run_id: str  # <job>@<slot>, chosen by the API
    job_id: str
    slot: datetime
    requested_at: datetime
    requested_by: str = ""  # who asked: the API token's name ("anonymous" without tokens)


@dataclass(frozen=True)
class ConfigSnapshot:
    """The jobs, nodes and file errors a peer has loaded, as JSON-ready dicts."""

    peer_id: str
    digest: str
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)
    loaded_at: datetime | None = None


@dataclass(frozen=True)
class Finish:
    """The arguments of one run's ``finish_run``, for ``finish_runs``."""

    run_id: str
    state: RunState
    ended_at: datetime
    exit_code: int | None = None
    reason: str = ""


@dataclass(frozen=True)
class NodeHealth:
    """A node that failed to connect: why, since when, and when it is to be tried again."""

    node_id: str
    reason: str
    since: datetime
    failures: int = 1
    reported_by: str = ""
    next_check: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        from distcrond.runs import format_slot

        return {
            "node_id": self.node_id,
            "reason": self.reason,
            "since": format_slot(self.since),
            "failures": self.failures,
            "reported_by": self.reported_by,
            "next_check": format_slot(self.next_check) if self.next_check else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NodeHealth:
        from distcrond.runs import parse_slot

        return cls(
            node_id=data["node_id"],
            reason=data.get("reason", ""),
            since=parse_slot(data["since"]),
            failures=int(data.get("failures", 1)),
            reported_by=data.get("reported_by", ""),
            next_check=parse_slot(data["next_check"]) if data.get("next_check") else None,
        )


@dataclass(frozen=True)
class SchedulingView:
    """What a scheduler pass reads of the cluster when its cached view is stale."""

    active_run_ids: set[str]
    peers: list[PeerInfo]
    node_health: dict[str, NodeHealth]


class LeadershipListener(Protocol):
    """Told when this peer gains or loses leadership, on a thread of the store's, in order.
    Its methods must return at once (hand the transition on): the store may tell it from
    the thread that also delivers its other callbacks."""

    def establish_leadership(self, epoch: int) -> None: ...

    def revoke_leadership(self) -> None: ...


_IMMUTABLE_FIELDS = frozenset({"run_id", "job_id", "slot"})

RunChange = Callable[[RunRecord], "RunRecord | None"]


def has_values(record: RunRecord, expect: Mapping[str, Any] | None) -> bool:
    """Whether ``record`` has every field value of ``expect`` (None: no condition)."""
    return not expect or all(getattr(record, k) == v for k, v in expect.items())


def update_change(changes: dict[str, Any], expect: Mapping[str, Any] | None) -> RunChange:
    """The record change of ``update_run`` (every backend's): ValueError for a change it
    refuses; the change gives None for a finished run or one without the ``expect`` values."""
    if _IMMUTABLE_FIELDS & changes.keys():
        raise ValueError(f"cannot change {sorted(_IMMUTABLE_FIELDS & changes.keys())}")
    if "state" in changes:
        changes["state"] = RunState(changes["state"])
        if changes["state"].terminal:
            raise ValueError("use finish_run to end a run")

    def change(record: RunRecord) -> RunRecord | None:
        if record.state.terminal or not has_values(record, expect):
            return None
        return record.replace(**changes)

    return change


def finish_change(
    state: RunState,
    ended_at: datetime,
    exit_code: int | None,
    reason: str,
    expect: Mapping[str, Any] | None,
) -> RunChange:
    """The record change of ``finish_run`` (every backend's)."""
    state = RunState(state)
    if not state.terminal:
        raise ValueError(f"{state} is not a terminal state")

    def change(record: RunRecord) -> RunRecord | None:
        if record.state.terminal or not has_values(record, expect):
            return None
        return record.replace(state=state, ended_at=ended_at, exit_code=exit_code, reason=reason)

    return change


def claimed_record(record: RunRecord, started_at: datetime) -> RunRecord:
    """The record of a run claimed at ``started_at``: running, started then or at its
    slot, whichever is later (a run claimed ahead of its slot starts at its slot)."""
    return record.replace(state=RunState.RUNNING, started_at=max(started_at, record.slot))


def cancel_change(by: str | None) -> RunChange:
    """The record change of ``request_cancel`` (every backend's): the first request counts."""

    def change(record: RunRecord) -> RunRecord | None:
        if record.state.terminal or record.cancel_requested:
            return None
        return record.replace(cancel_requested=True, cancelled_by=by)

    return change


class CoordinationStore(ABC):
    """Shared coordination state. Thread-safe; one instance per process."""

    backend: str = "abstract"

    # -- lifecycle -----------------------------------------------------------
    @abstractmethod
    def close(self) -> None:
        """Release connections and watches; ephemeral state (membership) goes with it."""

    @abstractmethod
    def status(self) -> StoreStatus:
        """Whether the store answers now."""

    def wait_connected(self, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds for the store's connection; whether it is up.
        A store without a connection to lose (SQLite) is always up."""
        return True

    def reconnected_at(self) -> datetime | None:
        """When this instance's connection last came back (wall clock), None if it never
        went. Until then no peer could claim a run, so no run is overdue on a peer for
        the time before (the leader's suspicion of idle peers counts from it)."""
        return None

    # -- membership ----------------------------------------------------------
    @abstractmethod
    def register_peer(self, peer: PeerInfo) -> None:
        """Publish (or update) this peer's record; it lives as long as the session."""

    @abstractmethod
    def unregister_peer(self, peer_id: str) -> None:
        """Remove a peer's record (clean shutdown)."""

    @abstractmethod
    def peers(self) -> list[PeerInfo]:
        """Live peers, sorted by id."""

    # -- leadership ----------------------------------------------------------
    @abstractmethod
    def start_election(self, peer_id: str, listener: LeadershipListener) -> None:
        """Stand for leader; the listener is told when leadership starts and ends."""

    @abstractmethod
    def stop_election(self) -> None:
        """Withdraw (abdicate at once if leader, telling the listener)."""

    @abstractmethod
    def leader(self) -> LeaderInfo | None:
        """The current leader, if any."""

    @abstractmethod
    def resign(self, epoch: int) -> None:
        """Give up the leadership of ``epoch`` now, if this peer still holds it, and stand
        again: the lock is released at once (the next contender takes over), the listener
        is told ``revoke_leadership``, and this peer contends again behind the others. A
        no-op otherwise. Returns without waiting for any of it or for the listener."""

    @abstractmethod
    def publish_scheduler_pass(self, status: SchedulerPass) -> None:
        """Record the leader's newest completed scheduler pass, for every peer's health
        check. Best effort: it may return before the write lands, and a failed write is
        logged, never raised (the next pass publishes again)."""

    @abstractmethod
    def scheduler_pass(self) -> SchedulerPass | None:
        """The newest scheduler pass published (by whichever leader), if any."""

    # -- run records ---------------------------------------------------------
    @abstractmethod
    def record_runs(
        self,
        epoch: int,
        runs: Sequence[RunRecord],
        cursors: dict[str, datetime] | None = None,
    ) -> list[RunRecord]:
        """Atomically create the runs not recorded yet and advance the jobs' cursors.

        Returns the runs that were created. Raises FencedOut when ``epoch`` is stale.
        """

    @abstractmethod
    def cursors(self) -> dict[str, datetime]:
        """The newest slot the scheduler has dealt with, per job."""

    @abstractmethod
    def get_run(self, run_id: str) -> RunRecord | None: ...

    def get_runs(self, run_ids: Iterable[str]) -> list[RunRecord]:
        """The records of the runs that exist among ``run_ids`` (a store that can reads them
        together)."""
        return [record for run_id in run_ids if (record := self.get_run(run_id)) is not None]

    @abstractmethod
    def runs(
        self,
        *,
        job_id: str | None = None,
        peer_id: str | None = None,
        states: Iterable[RunState] | None = None,
    ) -> list[RunRecord]:
        """Recorded runs (not yet pruned) matching all the filters, oldest slot first."""

    @abstractmethod
    def active_run_ids(self) -> set[str]:
        """Ids of the runs in an active state (cheaper than ``runs(states=ACTIVE_STATES)``)."""

    @abstractmethod
    def claim_run(self, run_id: str, peer_id: str, started_at: datetime) -> RunRecord | None:
        """Compare-and-set assigned -> running for ``peer_id``; None if not claimable."""

    # True when claim_runs claims many runs in one write (SQLite: one transaction;
    # ZooKeeper: one multi-operation transaction): the executor then claims the runs that
    # arrive together in one call. The default claims one after the other.
    claims_in_batches: bool = False

    def claim_runs(
        self, run_ids: Sequence[str], peer_id: str, started_at: datetime
    ) -> dict[str, RunRecord]:
        """:meth:`claim_run` for each run id: the ones claimed, by id. A run claimed ahead of
        its slot is recorded as started at its slot (:func:`claimed_record`)."""
        claimed: dict[str, RunRecord] = {}
        for run_id in run_ids:
            try:
                record = self.claim_run(run_id, peer_id, started_at)
            except StoreUnavailable as e:
                if claimed:
                    raise ClaimInterrupted(e, claimed) from e
                raise
            if record is not None:
                claimed[run_id] = record
        return claimed

    @abstractmethod
    def update_run(
        self, run_id: str, *, expect: Mapping[str, Any] | None = None, **changes: Any
    ) -> RunRecord | None:
        """Change fields of an active run (attempt, reason...); None if it is unknown,
        finished, or does not have the ``expect`` values."""

    @abstractmethod
    def finish_run(
        self,
        run_id: str,
        state: RunState,
        *,
        ended_at: datetime,
        exit_code: int | None = None,
        reason: str = "",
        expect: Mapping[str, Any] | None = None,
    ) -> RunRecord | None:
        """Move an active run to a terminal state (idempotent: a finished run stays as it was).
        With ``expect``, an active run without those values is returned unchanged."""

    def finish_runs(self, finishes: Sequence[Finish]) -> dict[str, RunRecord | None]:
        """:meth:`finish_run` of each run (without expectations): the record after, by run id.
        A store that can writes them together (SQLite: one transaction; ZooKeeper: one
        multi-operation transaction)."""
        return {f.run_id: self._finish_one(f) for f in finishes}

    def _finish_one(self, f: Finish) -> RunRecord | None:
        return self.finish_run(
            f.run_id, f.state, ended_at=f.ended_at, exit_code=f.exit_code, reason=f.reason
        )

    @abstractmethod
    def executing_runs(self) -> set[str]:
        """Ids of the runs whose executing peer holds them now: claimed (``running``), and that
        peer's session (ZooKeeper) or registration (embedded) still alive."""

    @abstractmethod
    def request_cancel(self, run_id: str, by: str | None = None) -> bool:
        """Ask the executing peer to stop an active run, on behalf of ``by`` (an API
        token's name; None: the scheduler, replacing it); False when it is not active.
        A second request changes nothing: the first one's ``by`` is kept."""

    @abstractmethod
    def watch_runs(self, peer_id: str, callback: Callable[[RunRecord], None]) -> None:
        """Call ``callback`` for runs assigned to ``peer_id`` and for cancel requests on its runs,
        first for those that exist now, then as they appear."""

    @abstractmethod
    def prune_runs(self, finished_before: datetime, keep: int | None = None) -> int:
        """Delete terminal runs that ended before the instant and, with ``keep``, the
        terminal runs beyond the ``keep`` newest (by slot); returns how many."""

    # -- manual triggers -----------------------------------------------------
    @abstractmethod
    def request_trigger(self, request: TriggerRequest) -> None:
        """Queue a manual run (idempotent on its run id)."""

    @abstractmethod
    def pending_triggers(self) -> list[TriggerRequest]:
        """Queued manual runs, oldest first."""

    @abstractmethod
    def remove_trigger(self, run_id: str) -> None:
        """Drop a consumed trigger (idempotent)."""

    @abstractmethod
    def watch_triggers(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (no arguments) soon after a trigger is queued."""

    # -- loaded configuration ------------------------------------------------
    @abstractmethod
    def publish_config(self, snapshot: ConfigSnapshot) -> None:
        """Publish what a peer has loaded; the API reads it from here."""

    @abstractmethod
    def config(self, peer_id: str) -> ConfigSnapshot | None:
        """The snapshot a peer published last."""

    # -- node health ---------------------------------------------------------
    @abstractmethod
    def set_node_health(self, health: NodeHealth) -> None:
        """Record (or replace) a node's unhealthy state."""

    @abstractmethod
    def clear_node_health(self, node_id: str) -> None:
        """The node answers again (idempotent)."""

    @abstractmethod
    def node_health(self) -> dict[str, NodeHealth]:
        """The nodes recorded unhealthy, by id."""

    def scheduling_view(self) -> SchedulingView:
        """:meth:`active_run_ids`, :meth:`peers` and :meth:`node_health` together. A store
        with round trips reads them at once (ZooKeeper: two instead of six): after a
        reconnection, when the ensemble is busiest, a pass's reads were most of the time
        from the connection's return to the first slot recorded."""
        return SchedulingView(self.active_run_ids(), self.peers(), self.node_health())
