"""Runs: the execution of one slot of one job on one node, and how it is named.

A run id is deterministic, ``<job>@<slot>`` (slot in UTC, RFC 3339 with
microseconds and a ``Z``), so that every layer can make its writes idempotent.
A policy that runs one slot on several nodes (``hosts: all`` or a count above
one) names each node's run ``<job>@<slot>~<node>``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any


class RunState(StrEnum):
    """A run's state. The last five are terminal: every slot ends in exactly one of them."""

    ASSIGNED = "assigned"  # recorded and assigned to a peer, not started
    RUNNING = "running"  # claimed by its peer; the process is (or is about to be) running
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"  # not started on purpose (concurrency: forbid, job disabled...)
    MISSED = "missed"  # fell due while no leader could start it, and the misfire policy dropped it
    UNKNOWN = "unknown"  # its peer died or lost its session mid-run: outcome unknown

    @property
    def terminal(self) -> bool:
        return self not in (RunState.ASSIGNED, RunState.RUNNING)


ACTIVE_STATES = (RunState.ASSIGNED, RunState.RUNNING)


class Trigger(StrEnum):
    SCHEDULE = "schedule"
    MANUAL = "manual"
    MISFIRE = "misfire"  # a slot run late, after a period with no leader


def format_slot(slot: datetime) -> str:
    """RFC 3339 in UTC with microseconds and a Z: '2026-11-27T03:10:00.000000Z'."""
    if slot.tzinfo is None:
        raise ValueError("slots are timezone-aware datetimes")
    return slot.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_slot(text: str) -> datetime:
    """Inverse of :func:`format_slot`; accepts any RFC 3339 instant."""
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if value.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone")
    try:
        return value.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00:00+01:00 is before the calendar in UTC
        raise ValueError(f"{text!r} is outside the calendar in UTC") from None


def run_id_for(job_id: str, slot: datetime, node_id: str | None = None) -> str:
    """The deterministic id of a slot's run (per node when the policy runs on several)."""
    base = f"{job_id}@{format_slot(slot)}"
    return f"{base}~{node_id}" if node_id else base


def split_run_id(run_id: str) -> tuple[str, datetime, str | None]:
    """(job id, slot, node id or None) of a run id; ValueError when it is not one."""
    job_id, sep, rest = run_id.partition("@")
    if not sep or not job_id:
        raise ValueError(f"{run_id!r} is not a run id '<job>@<slot>'")
    slot_text, _, node_id = rest.partition("~")
    return job_id, parse_slot(slot_text), node_id or None


def _iso(value: datetime | None) -> str | None:
    return format_slot(value) if value else None


@dataclass(frozen=True)
class RunRecord:
    """The coordination store's record of a run: its live state, no output."""

    run_id: str
    job_id: str
    slot: datetime
    node_id: str | None
    peer_id: str | None
    state: RunState
    trigger: Trigger = Trigger.SCHEDULE
    attempt: int = 0
    epoch: int = 0
    created_at: datetime | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    exit_code: int | None = None
    reason: str = ""
    # at_least_once runs are re-run under the same id when their peer dies mid-run.
    at_least_once: bool = False
    cancel_requested: bool = False
    # Who asked for it by hand (the API token's name; None for a scheduled slot), and who
    # asked to cancel it (None: the scheduler itself, for concurrency: replace).
    triggered_by: str | None = None
    cancelled_by: str | None = None

    def replace(self, **changes: Any) -> RunRecord:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "job_id": self.job_id,
            "slot": format_slot(self.slot),
            "node_id": self.node_id,
            "peer_id": self.peer_id,
            "state": self.state.value,
            "trigger": self.trigger.value,
            "attempt": self.attempt,
            "epoch": self.epoch,
            "created_at": _iso(self.created_at),
            "started_at": _iso(self.started_at),
            "ended_at": _iso(self.ended_at),
            "exit_code": self.exit_code,
            "reason": self.reason,
            "at_least_once": self.at_least_once,
            "cancel_requested": self.cancel_requested,
            "triggered_by": self.triggered_by,
            "cancelled_by": self.cancelled_by,
        }

    def to_stored_json(self) -> dict[str, Any]:
        """:meth:`to_json` without the fields at their defaults, as a store keeps it.

        ZooKeeper holds every record in its servers' heaps and writes them all in the
        snapshot a new ensemble leader takes before it serves: a third less to write
        is a third less of that pause. :meth:`from_json` reads either form, and a peer
        of an earlier version too (it reads each of these fields with its default).
        """
        return {k: v for k, v in self.to_json().items() if _STORED_DEFAULTS.get(k, _KEEP) != v}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunRecord:
        def dt(key: str) -> datetime | None:
            v = data.get(key)
            return parse_slot(v) if v else None

        return cls(
            run_id=data["run_id"],
            job_id=data["job_id"],
            slot=parse_slot(data["slot"]),
            node_id=data.get("node_id"),
            peer_id=data.get("peer_id"),
            state=RunState(data["state"]),
            trigger=Trigger(data.get("trigger", "schedule")),
            attempt=int(data.get("attempt", 0)),
            epoch=int(data.get("epoch", 0)),
            created_at=dt("created_at"),
            started_at=dt("started_at"),
            ended_at=dt("ended_at"),
            exit_code=data.get("exit_code"),
            reason=data.get("reason", ""),
            at_least_once=bool(data.get("at_least_once", False)),
            cancel_requested=bool(data.get("cancel_requested", False)),
            triggered_by=data.get("triggered_by"),
            cancelled_by=data.get("cancelled_by"),
        )


_KEEP = object()
# The JSON value of each optional RunRecord field at its default: to_stored_json leaves
# such fields out. run_id, job_id, slot and state are always written.
_STORED_DEFAULTS: dict[str, Any] = {
    "node_id": None,
    "peer_id": None,
    "trigger": Trigger.SCHEDULE.value,
    "attempt": 0,
    "epoch": 0,
    "created_at": None,
    "started_at": None,
    "ended_at": None,
    "exit_code": None,
    "reason": "",
    "at_least_once": False,
    "cancel_requested": False,
    "triggered_by": None,
    "cancelled_by": None,
}


@dataclass(frozen=True)
class RunReport:
    """A finished run as the report store keeps it: the record's facts plus its output."""

    run_id: str
    job_id: str
    slot: datetime
    state: RunState
    node_id: str | None = None
    peer_id: str | None = None
    trigger: Trigger = Trigger.SCHEDULE
    attempts: int = 0
    started_at: datetime | None = None
    ended_at: datetime | None = None
    exit_code: int | None = None
    reason: str = ""
    stdout: str = ""
    stderr: str = ""
    output_truncated: bool = False
    triggered_by: str | None = None
    cancelled_by: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def duration_ms(self) -> int | None:
        if self.started_at and self.ended_at:
            return int((self.ended_at - self.started_at).total_seconds() * 1000)
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "job_id": self.job_id,
            "slot": format_slot(self.slot),
            "state": self.state.value,
            "node_id": self.node_id,
            "peer_id": self.peer_id,
            "trigger": self.trigger.value,
            "attempts": self.attempts,
            "started_at": _iso(self.started_at),
            "ended_at": _iso(self.ended_at),
            "duration_ms": self.duration_ms,
            "exit_code": self.exit_code,
            "reason": self.reason,
            "stdout": self.stdout,
            "stderr": self.stderr,
            "output_truncated": self.output_truncated,
            "triggered_by": self.triggered_by,
            "cancelled_by": self.cancelled_by,
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunReport:
        def dt(key: str) -> datetime | None:
            v = data.get(key)
            return parse_slot(v) if v else None

        return cls(
            run_id=data["run_id"],
            job_id=data["job_id"],
            slot=parse_slot(data["slot"]),
            state=RunState(data["state"]),
            node_id=data.get("node_id"),
            peer_id=data.get("peer_id"),
            trigger=Trigger(data.get("trigger", "schedule")),
            attempts=int(data.get("attempts", 0)),
            started_at=dt("started_at"),
            ended_at=dt("ended_at"),
            exit_code=data.get("exit_code"),
            reason=data.get("reason", ""),
            stdout=data.get("stdout", ""),
            stderr=data.get("stderr", ""),
            output_truncated=bool(data.get("output_truncated", False)),
            triggered_by=data.get("triggered_by"),
            cancelled_by=data.get("cancelled_by"),
            extra=dict(data.get("extra") or {}),
        )

    @classmethod
    def from_record(cls, record: RunRecord, **fields: Any) -> RunReport:
        """A report of a record that carries no output (skipped, missed, unknown...)."""
        base: dict[str, Any] = dict(
            run_id=record.run_id,
            job_id=record.job_id,
            slot=record.slot,
            state=record.state,
            node_id=record.node_id,
            peer_id=record.peer_id,
            trigger=record.trigger,
            attempts=record.attempt,
            started_at=record.started_at,
            ended_at=record.ended_at,
            exit_code=record.exit_code,
            reason=record.reason,
            triggered_by=record.triggered_by,
            cancelled_by=record.cancelled_by,
        )
        base.update(fields)
        return cls(**base)
