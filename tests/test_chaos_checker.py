"""The chaos checker's pure logic, on hand-made ledgers, records and faults (no processes)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from distcrond.config.models import JobSpec
from distcrond.runs import run_id_for
from integration.chaos.checker import (
    LedgerLine,
    cutoff_starts,
    duplicates,
    expected_runs,
    in_window,
    parse_ledger,
    recovery_s,
    report_problems,
    silent_misses,
    started_early,
)
from integration.chaos.faults import RULES, Fault, parse_kinds
from integration.chaos.summary import (
    Verdict,
    exit_status,
    kind_rows,
    render_evidence,
    render_table,
    to_json,
)

T0 = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC).timestamp()  # a whole second
S = 4.0


def rid(job: str, slot: float, node: str | None = None) -> str:
    return run_id_for(job, datetime.fromtimestamp(slot, UTC), node)


def line(job: str, slot: float, peer: str = "peer-1", at: float | None = None) -> LedgerLine:
    """A ledger line of the slot at ``slot`` (epoch s), written at ``at`` (default: the slot)."""
    return LedgerLine(rid(job, slot), peer, slot if at is None else at, job, slot)


def spec(job_id: str, **fields: object) -> JobSpec:
    return JobSpec.model_validate({"id": job_id, "command": ["true"], **fields})


def test_parse_ledger_reads_run_id_peer_and_time_and_counts_malformed_lines() -> None:
    rows = [
        [rid("a", T0), "peer-2", f"{T0 + 0.01:.9f}"],
        ["not-a-run-id", "peer-1", "1.0"],
        [rid("a", T0 + 1)],  # a torn line
    ]
    lines, malformed = parse_ledger(rows)
    assert malformed == 2
    (found,) = lines
    assert (found.run_id, found.peer, found.job_id, found.slot) == (rid("a", T0), "peer-2", "a", T0)
    assert found.at == pytest.approx(T0 + 0.01)


def test_a_run_id_twice_in_the_ledger_is_a_duplicate_with_both_lines() -> None:
    first, again = line("a", T0, "peer-1"), line("a", T0, "peer-2", at=T0 + 5)
    found = duplicates([first, line("a", T0 + 1), again, line("b", T0)])
    assert found == {rid("a", T0): [first, again]}


def test_at_least_once_jobs_may_repeat_their_run_id() -> None:
    lines = [line("idem", T0), line("idem", T0, "peer-2", at=T0 + 5)]
    assert duplicates(lines, at_least_once=["idem"]) == {}
    assert list(duplicates(lines)) == [rid("idem", T0)]


def test_expected_runs_are_every_slot_in_the_window_excluding_its_start() -> None:
    jobs = {"a": spec("a", schedule={"every": "1s"})}
    assert expected_runs(jobs, (T0, T0 + 3)) == [rid("a", T0 + n) for n in (1, 2, 3)]


def test_hosts_all_jobs_owe_one_run_per_node_and_disabled_jobs_owe_none() -> None:
    jobs = {
        "all": spec("all", schedule={"every": "1s"}, policy={"hosts": "all"}),
        "off": spec("off", schedule={"every": "1s"}, enabled=False),
    }
    found = expected_runs(jobs, (T0, T0 + 1), {"all": ["local", "ssh-a"]})
    assert found == [rid("all", T0 + 1, "local"), rid("all", T0 + 1, "ssh-a")]


def test_fuzzy_slots_come_from_the_schedule_not_whole_seconds() -> None:
    jobs = {"f": spec("f", schedule={"every": "1s", "fuzzy": True})}
    (run_id,) = expected_runs(jobs, (T0, T0 + 1))
    assert run_id.startswith("f@2026-12-01T12:00:0") and not run_id.endswith(".000000Z")


def test_a_slot_with_no_record_or_a_stuck_active_one_is_a_silent_miss() -> None:
    expected = ["a@1", "a@2", "a@3", "a@4"]
    states: dict[str, str | None] = {"a@1": "succeeded", "a@2": "running", "a@4": "unknown"}
    assert silent_misses(expected, states) == {"a@2": "running", "a@3": "none"}


def test_every_terminal_state_counts_as_a_record() -> None:
    states: dict[str, str | None] = {
        s: s for s in ("succeeded", "failed", "skipped", "missed", "unknown")
    }
    assert silent_misses(list(states), states) == {}


def test_in_window_keeps_lines_by_their_slot() -> None:
    lines = [line("a", T0), line("a", T0 + 1, at=T0 + 50), line("a", T0 + 2)]
    assert in_window(lines, (T0, T0 + 1)) == [lines[1]]


def test_an_executed_run_needs_exactly_one_report() -> None:
    counts = {"a@1": 1, "a@2": 2}
    assert report_problems(["a@1", "a@2", "a@3", "a@1"], counts) == {"a@2": 2, "a@3": 0}


def test_a_cut_off_peer_may_not_start_anything_after_its_session_is_gone() -> None:
    fault = Fault("partition-follower", "peer-2", start=T0, end=T0 + S + 3)
    before_expiry = line("a", T0 + 1, "peer-2", at=T0 + S)  # a claim may still start
    after_expiry = line("a", T0 + 5, "peer-2", at=T0 + S + 1)
    other_peer = line("b", T0 + 5, "peer-1", at=T0 + S + 1)
    after_heal = line("a", T0 + 8, "peer-2", at=T0 + S + 3.5)
    lines = [before_expiry, after_expiry, other_peer, after_heal]
    assert cutoff_starts(fault, lines, S) == [after_expiry]


def test_the_cut_off_rule_applies_to_pauses_and_partitions_only() -> None:
    lines = [line("a", T0 + 6, "peer-2", at=T0 + 6)]
    kill = Fault("kill-follower", "peer-2", start=T0, end=T0 + 10)
    pause = Fault("pause-follower-long", "peer-2", start=T0, end=T0 + 10)
    assert cutoff_starts(kill, lines, S) == []
    assert cutoff_starts(pause, lines, S) == lines


def test_recovery_is_the_first_run_of_a_slot_after_the_fault() -> None:
    fault = Fault("kill-leader", "peer-1", start=T0, end=T0 + 3)
    lines = [
        line("a", T0 + 0.05, at=T0 + 0.06),  # slot recorded before the fault: not recovery
        line("a", T0 + 1, at=T0 + 4.5),  # catch-up of a slot missed during the failover
        line("b", T0 + 5, at=T0 + 5),
    ]
    assert recovery_s(fault, lines) == pytest.approx(4.5)


def test_a_short_pause_is_measured_from_its_heal() -> None:
    fault = Fault("pause-leader-short", "peer-1", start=T0, end=T0 + 2)
    lines = [line("a", T0 + 0.5, "peer-2", at=T0 + 2.3)]
    assert recovery_s(fault, lines) == pytest.approx(0.3)


def test_no_run_after_the_fault_means_no_recovery() -> None:
    fault = Fault("zk-kill-leader", "zk2", start=T0, end=T0 + 3)
    assert recovery_s(fault, [line("a", T0 - 1, at=T0 + 1)]) is None


def test_bounds_are_one_second_or_s_plus_one_and_none_for_clock_steps() -> None:
    assert RULES["kill-leader"].bound_s(S) == S + 1
    assert RULES["zk-kill-follower"].bound_s(S) == 1.0
    assert RULES["clock-step"].bound_s(S) is None
    with pytest.raises(ValueError, match="unknown nemesis"):
        parse_kinds("kill-leader,nope")


def verdict(faults: list[Fault], recoveries: list[float | None]) -> Verdict:
    return Verdict(1, 90, S, (T0, T0 + 90), faults, recoveries, slots_checked=10, executed=10)


def test_a_recovery_over_its_bound_or_missing_fails_the_run() -> None:
    ok = verdict([Fault("kill-leader", "peer-1", T0, T0 + 3)], [S + 0.5])
    slow = verdict([Fault("zk-kill-leader", "zk1", T0, T0 + 3)], [1.5])
    never = verdict([Fault("zk-kill-leader", "zk1", T0, T0 + 3)], [None])
    clock = verdict([Fault("clock-step", "peer-1", T0, T0 + 12)], [30.0])
    assert exit_status(ok) == 0 and exit_status(clock) == 0
    assert exit_status(slow) == 1 and exit_status(never) == 1
    assert kind_rows(never)[0]["never_recovered"] == 1


def test_a_slack_tolerates_a_late_recovery_up_to_it_but_never_a_missing_one() -> None:
    faults = [Fault("zk-kill-leader", "zk1", T0, T0 + 3), Fault("kill-leader", "peer-1", T0, T0)]
    late = verdict(faults, [1.8, S + 1.5])
    assert exit_status(late) == 1
    late.bound_slack_s = 1.0
    assert exit_status(late) == 0
    assert to_json(late)["recoveries_over_bound"] == 2
    assert to_json(late)["recoveries_over_bound_plus_slack"] == 0
    assert "within the slack of 1 s" in render_evidence(late)
    later = verdict(faults, [2.1, S + 1.5])
    later.bound_slack_s = 1.0
    assert exit_status(later) == 1
    never = verdict(faults[:1], [None])
    never.bound_slack_s = float("inf")  # as .ci/run: a fault never recovered from still fails
    assert exit_status(never) == 1


def test_any_invariant_violation_fails_the_run() -> None:
    v = verdict([], [])
    v.misses = {"a@1": "none"}
    assert exit_status(v) == 1


def test_a_hosts_all_slot_recorded_as_a_whole_settles_each_node_run() -> None:
    expected = ["all@1~local", "all@1~ssh-a", "all@2~local"]
    states: dict[str, str | None] = {"all@1": "skipped", "all@2~local": None, "all@2": None}
    assert silent_misses(expected, states) == {"all@2~local": "none"}


def test_the_table_and_json_name_each_kind_its_bound_and_the_invariant_counts() -> None:
    v = verdict(
        [
            Fault("kill-leader", "peer-1", T0, T0 + 3),
            Fault("kill-leader", "peer-2", T0 + 9, T0 + 12),
        ],
        [4.0, 6.0],
    )
    table = render_table(v)
    assert "kill-leader" in table and "NO" in table and "silent_misses" in table
    report = to_json(v)
    (row,) = report["kinds"]
    assert (row["count"], row["p50_s"], row["max_s"], row["bound_s"]) == (2, 4.0, 6.0, S + 1)
    assert row["within_bound"] is False and report["ok"] is False
    assert [f["recovery_s"] for f in report["faults"]] == [4.0, 6.0]


def test_a_run_well_before_its_slot_is_reported_as_early() -> None:
    on_time = line("a", T0 + 1, at=T0 + 0.95)  # claimed and started a little ahead
    early = line("a", T0 + 30, at=T0 + 2)
    assert started_early([on_time, early]) == [early]
