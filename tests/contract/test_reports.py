"""The report store contract: what every backend (SQLite, Elasticsearch) promises."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from distcrond.reporting.base import ReportStore, RunQuery
from distcrond.runs import RunReport, RunState, Trigger, run_id_for

T0 = datetime(2026, 11, 27, 3, 10, tzinfo=UTC)


def slot(i: int) -> datetime:
    return T0 + timedelta(minutes=i)


def report(
    job_id: str,
    i: int,
    *,
    state: RunState = RunState.SUCCEEDED,
    node_id: str | None = "n1",
    per_node: bool = False,
    stdout: str = "",
) -> RunReport:
    return RunReport(
        run_id=run_id_for(job_id, slot(i), node_id if per_node else None),
        job_id=job_id,
        slot=slot(i),
        state=state,
        node_id=node_id,
        peer_id="p1",
        started_at=slot(i) + timedelta(seconds=1),
        ended_at=slot(i) + timedelta(seconds=2),
        exit_code=0 if state == RunState.SUCCEEDED else 1,
        stdout=stdout,
    )


def walk(store: ReportStore, query: RunQuery) -> list[str]:
    """Every run id the query lists, page by page."""
    ids: list[str] = []
    cursor: str | None = None
    for _ in range(1000):
        page = store.list_runs(RunQuery(**{**query.__dict__, "cursor": cursor}))
        ids += [r.run_id for r in page.runs]
        if page.next_cursor is None:
            return ids
        cursor = page.next_cursor
    pytest.fail("pagination does not end")


def test_every_field_round_trips(reports: ReportStore) -> None:
    full = RunReport(
        run_id=run_id_for("backup", slot(0), "n2"),
        job_id="backup",
        slot=slot(0),
        state=RunState.FAILED,
        node_id="n2",
        peer_id="p1",
        trigger=Trigger.MANUAL,
        attempts=3,
        started_at=slot(0) + timedelta(microseconds=1),
        ended_at=slot(0) + timedelta(seconds=90, microseconds=999_999),
        exit_code=2,
        reason="exit status 2",
        stdout="héllo wörld ✓ 日本語\n\ttabs and \x1b[31mescapes\x1b[0m\n",
        stderr="tar: /srv: Cannot open: Permission denied\n",
        output_truncated=True,
        extra={"host": "db1.example.org", "attempt_errors": ["timeout", "ssh: refused"]},
    )
    reports.write([full])

    assert reports.get(full.run_id) == full


def test_minimal_report_round_trips(reports: ReportStore) -> None:
    minimal = RunReport(
        run_id=run_id_for("backup", slot(0)), job_id="backup", slot=slot(0), state=RunState.MISSED
    )
    reports.write([minimal])

    assert reports.get(minimal.run_id) == minimal


def test_get_of_an_unknown_run_is_none(reports: ReportStore) -> None:
    assert reports.get("nope@2026-01-01T00:00:00.000000Z") is None


def test_writing_a_run_again_keeps_one_report_with_the_latest_content(
    reports: ReportStore,
) -> None:
    first = report("backup", 0, state=RunState.RUNNING, stdout="partial")
    latest = report("backup", 0, state=RunState.SUCCEEDED, stdout="done")

    reports.write([first])
    reports.write([first])
    reports.write([latest])

    assert reports.get(first.run_id) == latest
    assert reports.list_runs(RunQuery()).runs == [latest]


def test_writing_nothing_is_allowed(reports: ReportStore) -> None:
    reports.write([])
    assert reports.list_runs(RunQuery()).runs == []


def test_list_is_newest_slot_first_with_ties_by_run_id_descending(reports: ReportStore) -> None:
    written = [
        report("backup", 1),
        report("backup", 3),
        report("report", 2, node_id="a", per_node=True),
        report("report", 2, node_id="b", per_node=True),
    ]
    reports.write(written)

    page = reports.list_runs(RunQuery())

    assert [r.run_id for r in page.runs] == [
        written[1].run_id,
        written[3].run_id,  # ...~b > ...~a
        written[2].run_id,
        written[0].run_id,
    ]
    assert page.next_cursor is None


def test_pagination_walks_every_run_once(reports: ReportStore) -> None:
    written = [report(f"job{i % 3}", i) for i in range(23)]
    reports.write(written)

    ids = walk(reports, RunQuery(limit=5))

    assert ids == [r.run_id for r in sorted(written, key=lambda r: r.slot, reverse=True)]


def test_pagination_continues_where_it_ended_despite_writes_in_between(
    reports: ReportStore,
) -> None:
    written = [report("backup", i) for i in range(10, 20)]
    reports.write(written)
    expected = [r.run_id for r in reversed(written)]

    first = reports.list_runs(RunQuery(limit=4))
    reports.write([report("backup", i) for i in range(20, 25)])  # newer than the walk
    reports.write([report("backup", 15, state=RunState.FAILED)])  # rewritten in place
    second = reports.list_runs(RunQuery(limit=4, cursor=first.next_cursor))
    third = reports.list_runs(RunQuery(limit=4, cursor=second.next_cursor))

    ids = [r.run_id for page in (first, second, third) for r in page.runs]
    assert ids == expected
    assert third.next_cursor is None


def test_a_page_that_ends_exactly_at_the_last_run_has_no_next_cursor(
    reports: ReportStore,
) -> None:
    reports.write([report("backup", i) for i in range(6)])

    first = reports.list_runs(RunQuery(limit=3))
    second = reports.list_runs(RunQuery(limit=3, cursor=first.next_cursor))

    assert first.next_cursor is not None
    assert len(second.runs) == 3
    assert second.next_cursor is None


def test_filters_by_job_state_node_and_slot_range(reports: ReportStore) -> None:
    runs = {
        "b0": report("backup", 0, node_id="n1"),
        "b1": report("backup", 1, node_id="n2", state=RunState.FAILED),
        "b2": report("backup", 2, node_id="n1", state=RunState.SKIPPED),
        "r1": report("report", 1, node_id="n2"),
        "r3": report("report", 3, node_id="n1", state=RunState.FAILED),
    }
    reports.write(list(runs.values()))

    def names(query: RunQuery) -> list[str]:
        by_id = {r.run_id: name for name, r in runs.items()}
        return [by_id[run_id] for run_id in walk(reports, query)]

    assert names(RunQuery(job_id="backup")) == ["b2", "b1", "b0"]
    assert names(RunQuery(states=(RunState.FAILED,))) == ["r3", "b1"]
    assert names(RunQuery(states=(RunState.FAILED, RunState.SKIPPED))) == ["r3", "b2", "b1"]
    assert names(RunQuery(node_id="n2")) == ["r1", "b1"]
    assert names(RunQuery(since=slot(1))) == ["r3", "b2", "r1", "b1"]
    assert names(RunQuery(until=slot(1))) == ["b0"]
    assert names(RunQuery(since=slot(1), until=slot(3))) == ["b2", "r1", "b1"]
    assert names(RunQuery(job_id="backup", node_id="n1", states=(RunState.SKIPPED,))) == ["b2"]
    assert names(RunQuery(job_id="nope")) == []
    assert names(RunQuery(job_id="backup", limit=1)) == ["b2", "b1", "b0"]


@pytest.mark.parametrize("cursor", ["", "not a cursor", "!!!", "bm9waXBl", "é"])
def test_a_malformed_cursor_is_rejected(reports: ReportStore, cursor: str) -> None:
    reports.write([report("backup", 0)])

    with pytest.raises(ValueError, match="invalid cursor"):
        reports.list_runs(RunQuery(cursor=cursor))


def test_limit_is_clamped_to_one_through_a_thousand(reports: ReportStore) -> None:
    reports.write([report("backup", i) for i in range(1005)])

    assert len(reports.list_runs(RunQuery(limit=0)).runs) == 1
    assert len(reports.list_runs(RunQuery(limit=-5)).runs) == 1
    assert len(reports.list_runs(RunQuery(limit=5000)).runs) == 1000
    assert len(reports.list_runs(RunQuery(limit=1000)).runs) == 1000


def test_status_is_ok(reports: ReportStore) -> None:
    status = reports.status()
    assert status.ok
    assert status.backend == reports.backend


def test_text_finds_runs_whose_output_has_every_word(reports: ReportStore) -> None:
    runs = {
        "disk": report("backup", 0, stdout="copied 12 files\nDisk FULL on /srv\n"),
        "net": replace(report("backup", 1), stderr="rsync: connection refused by host db1\n"),
        "both": replace(
            report("report", 2, stdout="disk check passed"), stderr="connection reset\n"
        ),
        "quiet": report("report", 3),
    }
    reports.write(list(runs.values()))

    def names(text: str, **filters: object) -> list[str]:
        by_id = {r.run_id: name for name, r in runs.items()}
        return [by_id[run_id] for run_id in walk(reports, RunQuery(text=text, **filters))]  # type: ignore[arg-type]

    assert names("disk") == ["both", "disk"]
    assert names("FULL") == ["disk"]  # case-insensitive
    assert names("full") == ["disk"]
    assert names("connection") == ["both", "net"]  # stderr too
    assert names("disk connection") == ["both"]  # every word
    assert names("refused db1") == ["net"]
    assert names("disk", job_id="backup") == ["disk"]
    assert names("nowhere") == []
    assert names("connection", limit=1) == ["both", "net"]  # pages through matches
