"""The run ledger that benchmark jobs append to, and the figures drawn from it.

Every benchmark job runs ``echo "$DISTCRON_RUN_ID $DISTCRON_SLOT $(date +%s.%N)" >> LEDGER``,
so each line says which slot ran and when its process actually started. From the
ledger and the slots that were due in a measurement window come lateness
percentiles, missed slots and slots run more than once. Shared by the standalone
benchmark and, later, the cluster ones.
"""

from __future__ import annotations

import math
import shlex
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from distcrond.config.models import JobSpec
from distcrond.runs import parse_slot, split_run_id
from distcrond.scheduling.schedules import next_slot

# A slot is keyed by (job id, its instant in whole microseconds since the epoch), so that
# matching does not depend on how a run id or DISTCRON_SLOT happens to be spelled.
SlotKey = tuple[str, int]


def ledger_command(ledger: Path) -> str:
    """The shell command each benchmark job runs: it records its own start time."""
    return f'echo "$DISTCRON_RUN_ID $DISTCRON_SLOT $(date +%s.%N)" >> {shlex.quote(str(ledger))}'


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def slot_us(slot: datetime) -> int:
    """An aware instant as whole microseconds since the epoch."""
    return (slot - _EPOCH) // timedelta(microseconds=1)


@dataclass(frozen=True)
class Entry:
    """One ledger line: a run, its slot and the wall-clock time its shell started."""

    run_id: str
    job_id: str
    slot_us: int
    started: float  # seconds since the epoch, from `date +%s.%N`

    @property
    def key(self) -> SlotKey:
        return (self.job_id, self.slot_us)

    @property
    def lateness_ms(self) -> float:
        return (self.started - self.slot_us / 1e6) * 1000.0


@dataclass(frozen=True)
class Ledger:
    entries: tuple[Entry, ...]
    malformed: int  # complete lines that could not be parsed
    partial: int  # 1 when the file ends in a line without its newline (cut off by a stop)


def parse_line(line: str) -> Entry | None:
    parts = line.split()
    try:
        if len(parts) == 3:
            run_id, slot_text, started = parts
            slot = parse_slot(slot_text)
            job_id = run_id.partition("@")[0]
        elif len(parts) == 2:  # DISTCRON_SLOT unset: the slot is in the run id
            run_id, started = parts
            job_id, slot, _ = split_run_id(run_id)
        else:
            return None
        return Entry(run_id, job_id, slot_us(slot), float(started))
    except ValueError:
        return None


def read_ledger(path: Path) -> Ledger:
    """Parse a ledger; a last line still being written (no newline yet) is not counted."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return Ledger((), 0, 0)
    lines = text.split("\n")
    tail = lines.pop()  # "" when the file ends in a newline, else a partial line
    entries: list[Entry] = []
    malformed = 0
    for line in lines:
        if not line.strip():
            continue
        entry = parse_line(line)
        if entry is None:
            malformed += 1
        else:
            entries.append(entry)
    return Ledger(tuple(entries), malformed, 1 if tail else 0)


def due_slots(jobs: Iterable[JobSpec], window: tuple[datetime, datetime]) -> set[SlotKey]:
    """Every (job, slot) due in [start, end), by the daemon's own schedule arithmetic."""
    start, end = window
    due: set[SlotKey] = set()
    for job in jobs:
        slot = next_slot(job.schedule, job.id, start - timedelta(microseconds=1))
        while slot < end:
            if slot >= start:
                due.add((job.id, slot_us(slot)))
            slot = next_slot(job.schedule, job.id, slot)  # strictly after
    return due


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an already sorted list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), math.ceil(q / 100.0 * len(sorted_values))))
    return sorted_values[rank - 1]


@dataclass(frozen=True)
class Figures:
    """What one runner did with one workload during the measurement window."""

    runner: str
    workload: str
    window_s: float
    expected: int  # slots due in the window
    ran: int  # of those, slots that ran at least once
    missed: int  # due in the window, never in the ledger
    duplicated: int  # slots (anywhere in the ledger) that ran more than once
    unexpected: int  # ledger slots inside the window that were never due
    p50_ms: float
    p99_ms: float
    max_ms: float
    runs_per_s: float
    malformed_lines: int
    rss_kb: int | None = None  # peak RSS (VmHWM) of the scheduling process
    api_rss_kb: int | None = None  # sum of the API server processes' VmHWM
    cpu_pct: float | None = None  # the scheduling process's CPU time in the window, % of one core

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def measure(
    runner: str,
    workload: str,
    ledger: Ledger,
    due: Iterable[SlotKey],
    window: tuple[datetime, datetime],
) -> Figures:
    """Compare what ran with what was due; lateness is of each slot's first start."""
    lo, hi = slot_us(window[0]), slot_us(window[1])
    due_set = set(due)
    counts = Counter(e.key for e in ledger.entries)
    first: dict[SlotKey, Entry] = {}
    for e in ledger.entries:
        if e.key not in first or e.started < first[e.key].started:
            first[e.key] = e
    in_window = {k: e for k, e in first.items() if lo <= k[1] < hi}
    late = sorted(e.lateness_ms for k, e in in_window.items() if k in due_set)
    ran = sum(1 for k in due_set if k in first)
    window_s = (hi - lo) / 1e6
    return Figures(
        runner=runner,
        workload=workload,
        window_s=window_s,
        expected=len(due_set),
        ran=ran,
        missed=len(due_set) - ran,
        duplicated=sum(1 for n in counts.values() if n > 1),
        unexpected=sum(1 for k in in_window if k not in due_set),
        p50_ms=percentile(late, 50),
        p99_ms=percentile(late, 99),
        max_ms=late[-1] if late else float("nan"),
        runs_per_s=len(in_window) / window_s if window_s > 0 else float("nan"),
        malformed_lines=ledger.malformed,
    )
