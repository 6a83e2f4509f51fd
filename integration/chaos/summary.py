"""What a chaos run found, as a table, as JSON, and as an exit status.

:class:`Verdict` holds the checker's findings; :func:`kind_rows` turns the faults'
recoveries into one row per kind (count, p50, max, bound, within bound);
:func:`render` prints the table and the invariants' counts, plus the evidence of
each recovery over its bound; :func:`exit_status` is 0 only when no invariant was
violated and every bounded recovery was within its bound plus ``bound_slack_s``
(``--bound-slack``, 0 by default: the bounds themselves), 1 otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from integration.chaos.checker import LedgerLine
from integration.chaos.faults import RULES, Fault

EVIDENCE_LIMIT = 20  # violations of one kind printed in full; the JSON has them all


@dataclass
class Verdict:
    """The checker's findings over one run."""

    seed: int
    seconds: float
    session_s: float
    window: tuple[float, float]
    faults: list[Fault]
    recoveries: list[float | None]  # one per fault, in order
    slots_checked: int
    executed: int
    duplicates: dict[str, list[LedgerLine]] = field(default_factory=dict)
    misses: dict[str, str] = field(default_factory=dict)
    reports: dict[str, int] = field(default_factory=dict)
    cutoffs: list[tuple[Fault, list[LedgerLine]]] = field(default_factory=list)
    malformed: int = 0
    notes: list[str] = field(default_factory=list)
    first_runs: list[LedgerLine | None] = field(default_factory=list)  # one per fault
    states: dict[str, int] = field(default_factory=dict)  # recorded state -> expected runs
    early: list[LedgerLine] = field(default_factory=list)  # reported, not a violation
    # A recovery fails the run when later than its bound + this (0: the bounds themselves).
    bound_slack_s: float = 0.0


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def kind_rows(verdict: Verdict) -> list[dict[str, Any]]:
    """One row per fault kind seen: count, recovery p50/max (s), bound, within bound."""
    rows: list[dict[str, Any]] = []
    for kind in dict.fromkeys(f.kind for f in verdict.faults):
        figures = [
            r for f, r in zip(verdict.faults, verdict.recoveries, strict=True) if f.kind == kind
        ]
        measured = [r for r in figures if r is not None]
        bound = RULES[kind].bound_s(verdict.session_s)
        within: bool | None = None
        if bound is not None:
            within = len(measured) == len(figures) and all(r <= bound for r in measured)
        rows.append(
            {
                "kind": kind,
                "count": len(figures),
                "never_recovered": len(figures) - len(measured),
                "p50_s": percentile(measured, 50),
                "max_s": max(measured, default=None),
                "bound_s": bound,
                "within_bound": within,
            }
        )
    return rows


def cutoff_count(verdict: Verdict) -> int:
    return sum(len(lines) for _fault, lines in verdict.cutoffs)


def invariant_counts(verdict: Verdict) -> dict[str, int]:
    return {
        "slots_checked": verdict.slots_checked,
        "runs_executed": verdict.executed,
        "duplicates": len(verdict.duplicates),
        "silent_misses": len(verdict.misses),
        "runs_without_exactly_one_report": len(verdict.reports),
        "starts_by_cut_off_peer": cutoff_count(verdict),
    }


def late_recoveries(verdict: Verdict, slack: float = 0.0) -> list[int]:
    """The faults (indices) whose recovery is missing or later than their bound + ``slack``."""
    late = []
    for i, (fault, r) in enumerate(zip(verdict.faults, verdict.recoveries, strict=True)):
        bound = RULES[fault.kind].bound_s(verdict.session_s)
        if bound is not None and (r is None or r > bound + slack):
            late.append(i)
    return late


def violated(verdict: Verdict) -> bool:
    """An invariant broken, or a recovery missing or later than its bound + the slack."""
    counts = invariant_counts(verdict)
    if any(counts[k] for k in counts if k not in ("slots_checked", "runs_executed")):
        return True
    return bool(late_recoveries(verdict, verdict.bound_slack_s))


def exit_status(verdict: Verdict) -> int:
    return 1 if violated(verdict) else 0


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def render_table(verdict: Verdict) -> str:
    head = f"{'fault kind':<22} {'count':>5} {'p50 s':>7} {'max s':>7} {'bound s':>8}  within"
    lines = [head, "-" * len(head)]
    for row in kind_rows(verdict):
        within = {True: "yes", False: "NO", None: "n/a"}[row["within_bound"]]
        if row["never_recovered"]:
            within += f" ({row['never_recovered']} never recovered)"
        lines.append(
            f"{row['kind']:<22} {row['count']:>5} {_fmt(row['p50_s']):>7} "
            f"{_fmt(row['max_s']):>7} {_fmt(row['bound_s']):>8}  {within}"
        )
    lines.append("")
    lines += [f"{name:<34} {value}" for name, value in invariant_counts(verdict).items()]
    if verdict.early:
        worst = max(x.slot - x.at for x in verdict.early)
        lines.append(
            f"{'runs started early (not checked)':<34} {len(verdict.early)}, "
            f"up to {worst:.1f} s before the slot"
        )
    if verdict.states:
        states = ", ".join(f"{k} {v}" for k, v in sorted(verdict.states.items()))
        lines.append(f"{'recorded states of the slots':<34} {states}")
    lines += [f"note: {note}" for note in verdict.notes]
    return "\n".join(lines)


def _line(line: LedgerLine) -> str:
    return f"{line.run_id} by {line.peer} at {line.at:.3f}"


def render_evidence(verdict: Verdict) -> str:
    """The violations, each with its run ids, peers and times (at most EVIDENCE_LIMIT each)."""
    out: list[str] = []
    for run_id, found in list(verdict.duplicates.items())[:EVIDENCE_LIMIT]:
        out.append(f"DUPLICATE {run_id}: " + "; ".join(_line(x) for x in found))
    for run_id, state in list(verdict.misses.items())[:EVIDENCE_LIMIT]:
        out.append(f"SILENT MISS {run_id}: record {state}")
    for run_id, n in list(verdict.reports.items())[:EVIDENCE_LIMIT]:
        out.append(f"REPORTS {run_id}: {n} report(s) for an executed run")
    for fault, found in verdict.cutoffs:
        for x in found[:EVIDENCE_LIMIT]:
            out.append(
                f"CUT-OFF START during {fault.kind} of {fault.target} "
                f"[{fault.start:.3f}, {fault.end}]: {_line(x)}"
            )
    firsts = verdict.first_runs or [None] * len(verdict.faults)
    failing = set(late_recoveries(verdict, verdict.bound_slack_s))
    for i in late_recoveries(verdict):
        fault, r, first = verdict.faults[i], verdict.recoveries[i], firsts[i]
        bound = RULES[fault.kind].bound_s(verdict.session_s)
        tolerated = "" if i in failing else f" (within the slack of {verdict.bound_slack_s:g} s)"
        out.append(
            f"RECOVERY {fault.kind} of {fault.target} at {fault.start:.3f} "
            f"(healed {fault.end}): {_fmt(r)} s > bound {bound:.2f} s{tolerated}; first run "
            "after: " + (_line(first) if first is not None else "none")
        )
    return "\n".join(out)


def to_json(verdict: Verdict) -> dict[str, Any]:
    def line(x: LedgerLine) -> dict[str, Any]:
        return {"run_id": x.run_id, "peer": x.peer, "at": x.at}

    return {
        "seed": verdict.seed,
        "seconds": verdict.seconds,
        "session_timeout_s": verdict.session_s,
        "window": list(verdict.window),
        "kinds": kind_rows(verdict),
        "invariants": invariant_counts(verdict),
        "ok": not violated(verdict),
        "bound_slack_s": verdict.bound_slack_s if math.isfinite(verdict.bound_slack_s) else None,
        "recoveries_over_bound": len(late_recoveries(verdict)),
        "recoveries_over_bound_plus_slack": len(late_recoveries(verdict, verdict.bound_slack_s)),
        "faults": [
            f.to_json() | {"recovery_s": r}
            for f, r in zip(verdict.faults, verdict.recoveries, strict=True)
        ],
        "duplicates": {k: [line(x) for x in v] for k, v in verdict.duplicates.items()},
        "silent_misses": verdict.misses,
        "report_problems": verdict.reports,
        "cutoff_starts": [
            {"fault": f.to_json(), "lines": [line(x) for x in found]}
            for f, found in verdict.cutoffs
            if found
        ],
        "recorded_states": verdict.states,
        "started_early": [line(x) | {"slot": x.slot} for x in verdict.early],
        "malformed_ledger_lines": verdict.malformed,
        "notes": verdict.notes,
    }
