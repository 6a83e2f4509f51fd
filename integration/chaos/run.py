"""The phases around the nemesis: waiting for the workload to run, and checking at the end.

:func:`wait_workload` polls the ledger until every job has run once (the warm-up).
:func:`check` waits for a leader, then reads the ledger and the stores until the
window's slots have settled (:func:`~integration.chaos.observe.settle`, with a
deadline), and returns the :class:`~integration.chaos.summary.Verdict`.
"""

from __future__ import annotations

from argparse import Namespace
from collections import Counter
from collections.abc import Callable

from integration.chaos import checker
from integration.chaos.nemesis import Nemesis
from integration.chaos.observe import (
    SETTLING_LOOKUPS,
    Reading,
    record_states,
    report_counts,
    settle,
)
from integration.chaos.services import Services
from integration.chaos.summary import Verdict
from integration.chaos.workload import Workload
from integration.peers import ledger_lines, wait_for

WARMUP_S = 2.0  # the window starts this long after the nemesis phase began
MARGIN_S = 1.0  # and ends this long before it ended
SETTLE_TIMEOUT_S = 120.0


def wait_workload(workload: Workload, timeout: float) -> None:
    """Until every job has a line in the ledger."""

    def all_ran() -> bool:
        lines, _ = checker.parse_ledger(ledger_lines(workload.ledger))
        return set(workload.jobs) <= {line.job_id for line in lines}

    wait_for(all_ran, timeout, "every job to run once", interval=0.2)


def reader(
    services: Services,
    workload: Workload,
    expected: list[str],
    window: tuple[float, float],
    lookups: int | None = SETTLING_LOOKUPS,
) -> Callable[[], Reading]:
    turn = [0]

    def read() -> Reading:
        assert services.cluster is not None
        peers = services.cluster.alive()
        peer = peers[turn[0] % len(peers)]
        turn[0] += 1
        counts, _ = report_counts(services.es.url)
        states = record_states(peer, sorted(workload.jobs), expected, window, lookups)
        return Reading(states=states, reports=counts)

    return read


def executed_in(workload: Workload, window: tuple[float, float]) -> list[str]:
    lines, _ = checker.parse_ledger(ledger_lines(workload.ledger))
    return [line.run_id for line in checker.in_window(lines, window)]


def check(
    services: Services,
    workload: Workload,
    nem: Nemesis,
    phase: tuple[float, float],
    args: Namespace,
    say: Callable[[str], None],
) -> Verdict:
    window = (phase[0] + WARMUP_S, phase[1] - MARGIN_S)
    notes = list(nem.notes)
    assert services.cluster is not None
    try:
        services.cluster.leader(timeout=60)
    except AssertionError as e:
        notes.append(f"no agreed leader after the heal: {e}")
    expected = checker.expected_runs(workload.specs(), window, workload.nodes_per_slot())
    say(f"chaos: settling {len(expected)} expected runs (at most {SETTLE_TIMEOUT_S:g} s)")

    def done(reading: Reading) -> bool:
        misses = checker.silent_misses(expected, reading.states)
        reports = checker.report_problems(executed_in(workload, window), reading.reports)
        say(f"  {len(misses)} runs without a terminal record, {len(reports)} report problems")
        return not misses and not reports

    reading = settle(reader(services, workload, expected, window), done, SETTLE_TIMEOUT_S, say)
    if not done(reading):  # the last reading looks up every run still missing
        reading = settle(reader(services, workload, expected, window, None), done, 0, say)
    notes += reading.errors
    lines, malformed = checker.parse_ledger(ledger_lines(workload.ledger))
    executed = [line.run_id for line in checker.in_window(lines, window)]
    session_s = services.session_s
    return Verdict(
        seed=args.seed,
        seconds=args.seconds,
        session_s=session_s,
        window=window,
        faults=nem.faults,
        recoveries=[checker.recovery_s(f, lines) for f in nem.faults],
        first_runs=[checker.first_run_after(f, lines) for f in nem.faults],
        states=dict(Counter(str(checker.recorded_state(r, reading.states)) for r in expected)),
        slots_checked=len(expected),
        executed=len(set(executed)),
        duplicates=checker.duplicates(lines, workload.at_least_once()),
        misses=checker.silent_misses(expected, reading.states),
        reports=checker.report_problems(executed, reading.reports),
        cutoffs=[(f, checker.cutoff_starts(f, lines, session_s)) for f in nem.faults],
        malformed=malformed,
        notes=notes,
        early=checker.started_early(lines),
        bound_slack_s=args.bound_slack,
    )
