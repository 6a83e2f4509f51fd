"""The checker's pure logic: invariants and recovery figures from a ledger, records and faults.

Nothing here touches a process, a file or the network: every function takes the
ledger lines (what the commands wrote), the stores' records and report counts
(fetched by ``observe.py``) and the faults (recorded by ``nemesis.py``), and
returns what it found, each finding with its evidence.

* :func:`duplicates`: a run id in the ledger more than once (``at_least_once``
  jobs excepted: they may repeat, always under their one run id).
* :func:`expected_runs` and :func:`silent_misses`: every slot of every job in the
  window needs exactly one terminal record; none (or one stuck active) is a miss.
* :func:`report_problems`: every executed run has exactly one report.
* :func:`cutoff_starts`: a paused or partitioned peer starts nothing in
  ``[fault start + S + margin, heal]``.
* :func:`recovery_s`: the time from a fault's reference instant until the first
  ledger line of a slot scheduled after the fault.
* :func:`started_early`: runs that started well before their slot (reported only).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from distcrond.config.models import JobSpec
from distcrond.runs import run_id_for, split_run_id
from distcrond.scheduling.schedules import slots_between
from integration.chaos.faults import CUTOFF_KINDS, Fault

TERMINAL = frozenset({"succeeded", "failed", "skipped", "missed", "unknown"})
SLOT_AHEAD_S = 0.1  # slots are recorded and claimed up to ~0.1 s before they are due
CUTOFF_MARGIN_S = 0.5  # after S: a run claimed just before the session went may still start
EARLY_S = 0.5  # a run that starts this long before its slot started early


@dataclass(frozen=True)
class LedgerLine:
    """One line a command appended: ``<run id> <peer> <epoch seconds>``."""

    run_id: str
    peer: str
    at: float  # when the command ran (epoch seconds, the real clock of its host)
    job_id: str
    slot: float  # the run's slot (epoch seconds)


def parse_ledger(rows: Iterable[Sequence[str]]) -> tuple[list[LedgerLine], int]:
    """The well-formed lines, and how many were not (split lines, as ``ledger_lines`` gives)."""
    lines: list[LedgerLine] = []
    malformed = 0
    for row in rows:
        try:
            run_id, peer, at = row
            job_id, slot, _node = split_run_id(run_id)
            lines.append(LedgerLine(run_id, peer, float(at), job_id, slot.timestamp()))
        except ValueError:
            malformed += 1
    return lines, malformed


def duplicates(
    lines: Iterable[LedgerLine], at_least_once: Iterable[str] = ()
) -> dict[str, list[LedgerLine]]:
    """Run ids executed more than once, with their lines (``at_least_once`` job ids exempt)."""
    exempt = set(at_least_once)
    by_run: dict[str, list[LedgerLine]] = defaultdict(list)
    for line in lines:
        if line.job_id not in exempt:
            by_run[line.run_id].append(line)
    return {run_id: found for run_id, found in sorted(by_run.items()) if len(found) > 1}


def _utc(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, UTC)


def expected_runs(
    jobs: Mapping[str, JobSpec],
    window: tuple[float, float],
    nodes_per_slot: Mapping[str, Sequence[str]] | None = None,
) -> list[str]:
    """Every run id the jobs owe in ``window`` (slots ``lo < slot <= hi``); a job listed in
    ``nodes_per_slot`` (``hosts: all``) owes one run per node, ``<job>@<slot>~<node>``."""
    per_node = nodes_per_slot or {}
    lo, hi = _utc(window[0]), _utc(window[1])
    found: list[str] = []
    for job_id, spec in sorted(jobs.items()):
        if not spec.enabled:
            continue
        for slot in slots_between(spec.schedule, job_id, lo, hi):
            nodes = per_node.get(job_id)
            if nodes:
                found.extend(run_id_for(job_id, slot, node) for node in nodes)
            else:
                found.append(run_id_for(job_id, slot))
    return found


def recorded_state(run_id: str, states: Mapping[str, str | None]) -> str | None:
    """The run's recorded state; for a per-node run without a terminal one, its slot's."""
    state = states.get(run_id)
    if state not in TERMINAL and "~" in run_id:
        state = states.get(run_id.partition("~")[0]) or state
    return state


def silent_misses(expected: Iterable[str], states: Mapping[str, str | None]) -> dict[str, str]:
    """Expected runs without a terminal record: run id -> what was found (``none`` or the
    active state it is stuck in). A per-node run (``<job>@<slot>~<node>``) is also settled
    by a terminal record of its whole slot (``<job>@<slot>``: a ``hosts: all`` slot that
    was skipped or missed is recorded once, for every node)."""
    missing: dict[str, str] = {}
    for run_id in expected:
        state = recorded_state(run_id, states)
        if state not in TERMINAL:
            missing[run_id] = state or "none"
    return missing


def in_window(lines: Iterable[LedgerLine], window: tuple[float, float]) -> list[LedgerLine]:
    """The lines whose slot falls in ``window`` (``lo < slot <= hi``)."""
    lo, hi = window
    return [line for line in lines if lo < line.slot <= hi]


def report_problems(executed: Iterable[str], report_counts: Mapping[str, int]) -> dict[str, int]:
    """Executed run ids that do not have exactly one report: run id -> number of reports."""
    return {
        run_id: report_counts.get(run_id, 0)
        for run_id in sorted(set(executed))
        if report_counts.get(run_id, 0) != 1
    }


def cutoff_starts(
    fault: Fault, lines: Iterable[LedgerLine], session_s: float, margin_s: float = CUTOFF_MARGIN_S
) -> list[LedgerLine]:
    """Lines by a paused or partitioned peer written after its session must be gone
    (``fault start + S + margin``) and before the heal; empty for other kinds."""
    if fault.kind not in CUTOFF_KINDS or fault.end is None:
        return []
    lo, hi = fault.start + session_s + margin_s, fault.end
    return [line for line in lines if line.peer == fault.target and lo <= line.at <= hi]


def first_run_after(fault: Fault, lines: Iterable[LedgerLine]) -> LedgerLine | None:
    """The first line written at or after the fault's reference instant whose slot is
    later than the fault's start + 0.1 s (so it was scheduled after the fault began)."""
    ref = fault.reference()
    after = [line for line in lines if line.at >= ref and line.slot > fault.start + SLOT_AHEAD_S]
    return min(after, key=lambda line: line.at, default=None)


def recovery_s(fault: Fault, lines: Iterable[LedgerLine]) -> float | None:
    """Seconds from the fault's reference instant until runs started again (None: never)."""
    first = first_run_after(fault, lines)
    return None if first is None else first.at - fault.reference()


def started_early(lines: Iterable[LedgerLine], early_s: float = EARLY_S) -> list[LedgerLine]:
    """Lines written more than ``early_s`` before their slot (a leader or executor whose
    wall clock runs ahead); reported, not an invariant of the brief."""
    return [line for line in lines if line.at < line.slot - early_s]
