"""RunRecord's stored form: what the ZooKeeper store writes for each run."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime

from distcrond.runs import RunRecord, RunState, Trigger, run_id_for

SLOT = datetime(2026, 12, 7, 12, 0, 1, 250000, tzinfo=UTC)


def finished() -> RunRecord:
    return RunRecord(
        run_id=run_id_for("backup", SLOT),
        job_id="backup",
        slot=SLOT,
        node_id="n1",
        peer_id="p1",
        state=RunState.SUCCEEDED,
        attempt=1,
        epoch=4,
        created_at=SLOT,
        started_at=SLOT,
        ended_at=SLOT,
        exit_code=0,
    )


def test_the_stored_form_leaves_out_the_fields_at_their_defaults() -> None:
    stored = finished().to_stored_json()
    assert set(stored) == {
        "run_id", "job_id", "slot", "state", "node_id", "peer_id", "attempt", "epoch",
        "created_at", "started_at", "ended_at", "exit_code",
    }  # fmt: skip
    assert stored["exit_code"] == 0  # a zero exit code is a value, not a default
    full = json.dumps(finished().to_json(), separators=(",", ":"))
    assert len(json.dumps(stored, separators=(",", ":"))) < 0.75 * len(full)


def test_the_stored_form_reads_back_as_the_same_record() -> None:
    record = finished()
    assert RunRecord.from_json(record.to_stored_json()) == record
    bare = RunRecord(record.run_id, "backup", SLOT, None, None, RunState.ASSIGNED)
    assert bare.to_stored_json() == {
        "run_id": record.run_id, "job_id": "backup", "slot": bare.to_json()["slot"],
        "state": "assigned",
    }  # fmt: skip
    assert RunRecord.from_json(bare.to_stored_json()) == bare


def test_every_field_away_from_its_default_is_kept() -> None:
    unusual = dataclasses.replace(
        finished(),
        trigger=Trigger.MANUAL,
        reason="cancelled",
        at_least_once=True,
        cancel_requested=True,
        triggered_by="ops",
        cancelled_by="ops",
        attempt=0,
        epoch=0,
    )
    stored = unusual.to_stored_json()
    for key in ("trigger", "reason", "at_least_once", "cancel_requested", "triggered_by"):
        assert key in stored, key
    assert "attempt" not in stored and "epoch" not in stored
    assert RunRecord.from_json(stored) == unusual
    # A peer of an earlier version reads the full form; this one reads it too.
    assert RunRecord.from_json(unusual.to_json()) == unusual
