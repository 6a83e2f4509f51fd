"""The report spool (distcrond/reporting/spool.py): durable appends with group commit,
ordered at-least-once delivery through outages, dead letters, restarts, and stats that
another process can read from the files alone.

The inner store is a test double of our own ``ReportStore`` interface (FakeInner), or
the real SQLite report store.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from distcrond.clock import FakeClock
from distcrond.coordination.base import StoreStatus, StoreUnavailable
from distcrond.reporting import spool as spool_module
from distcrond.reporting.base import ReportRejected, ReportStore, RunPage, RunQuery
from distcrond.reporting.spool import (
    DEAD_LETTERS,
    SpooledReportStore,
    SpoolLocked,
    SpoolStats,
    read_spool_stats,
    segment_name,
)
from distcrond.reporting.sqlite import SQLiteReportStore
from distcrond.runs import RunReport, RunState, run_id_for

pytestmark = pytest.mark.timeout(60)

T0 = datetime(2026, 11, 27, 3, 10, tzinfo=UTC)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        time.sleep(0.005)  # polling a condition with a deadline


def report(i: int, state: RunState = RunState.SUCCEEDED, **fields: Any) -> RunReport:
    slot = T0 + timedelta(minutes=i)
    base: dict[str, Any] = dict(
        run_id=run_id_for("job", slot),
        job_id="job",
        slot=slot,
        state=state,
        node_id="n1",
        started_at=slot,
        ended_at=slot + timedelta(seconds=3),
        exit_code=0 if state is RunState.SUCCEEDED else 1,
        stdout=f"output of run {i}\n",
    )
    base.update(fields)
    return RunReport(**base)


def spool_line(r: RunReport, t: float) -> bytes:
    return (json.dumps({"t": t, "r": r.to_json()}) + "\n").encode()


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.ndjson"), key=lambda p: p.name)


def waiting_files(directory: Path) -> list[Path]:
    """The segments that hold something (the active one may be empty)."""
    return [p for p in segment_files(directory) if p.name != DEAD_LETTERS and p.stat().st_size]


def spooled_lines(directory: Path) -> list[dict[str, Any]]:
    lines = []
    for path in segment_files(directory):
        if path.name != DEAD_LETTERS:
            lines += [json.loads(x) for x in path.read_bytes().splitlines()]
    return lines


def complete_lines(directory: Path) -> int:
    """Lines written in full so far: read while writers append, a last line may be cut."""
    return sum(
        path.read_bytes().count(b"\n")
        for path in segment_files(directory)
        if path.name != DEAD_LETTERS
    )


def dead_letters(directory: Path) -> list[dict[str, Any]]:
    path = directory / DEAD_LETTERS
    return [json.loads(x) for x in path.read_bytes().splitlines()] if path.exists() else []


class FakeInner(ReportStore):
    """A report store double: records batches, can be down, can refuse run ids."""

    backend = "fake"

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.error: Exception | None = None  # raised by write while set
        self.healthy_calls: int | None = None  # then down after that many good writes
        self.reject: dict[str, str] = {}
        self.batches: list[list[RunReport]] = []
        self.stored: dict[str, RunReport] = {}
        self.calls = 0
        self.closed = False
        self.on_write: Callable[[Sequence[RunReport]], None] | None = None

    def write(self, reports: Sequence[RunReport]) -> None:
        with self.lock:
            self.calls += 1
            if self.on_write is not None:
                self.on_write(reports)
            if self.error is not None:
                raise self.error
            self.batches.append(list(reports))
            refused = {}
            for r in reports:
                if r.run_id in self.reject:
                    refused[r.run_id] = self.reject[r.run_id]
                else:
                    self.stored[r.run_id] = r
            if self.healthy_calls is not None:
                self.healthy_calls -= 1
                if self.healthy_calls <= 0:
                    self.error, self.healthy_calls = StoreUnavailable("es down"), None
            if refused:
                raise ReportRejected(refused)

    def delivered(self) -> list[RunReport]:
        with self.lock:
            return [r for b in self.batches for r in b if r.run_id not in self.reject]

    def get(self, run_id: str) -> RunReport | None:
        with self.lock:
            if self.error is not None:
                raise StoreUnavailable("es down")
            return self.stored.get(run_id)

    def list_runs(self, query: RunQuery) -> RunPage:
        return RunPage(runs=list(self.stored.values()), next_cursor=None)

    def status(self) -> StoreStatus:
        return StoreStatus(ok=self.error is None, backend=self.backend, detail="fake store")

    def close(self) -> None:
        self.closed = True


def down() -> FakeInner:
    inner = FakeInner()
    inner.error = StoreUnavailable("es down")
    return inner


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def make_spool(spool_dir: Path) -> Iterator[Callable[..., SpooledReportStore]]:
    made: list[SpooledReportStore] = []

    def make(inner: ReportStore | None = None, **kw: Any) -> SpooledReportStore:
        kw.setdefault("retry_initial", 0.01)
        kw.setdefault("retry_max", 0.05)
        directory = kw.pop("directory", spool_dir)
        store = SpooledReportStore(inner or FakeInner(), directory, **kw)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


class FsyncCounter:
    """os.fsync, counting the calls on regular files (segments), not on directories."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.real = os.fsync
        self.files = 0
        self.lock = threading.Lock()
        self.before: Callable[[int], None] | None = None
        monkeypatch.setattr(os, "fsync", self)

    def __call__(self, fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            with self.lock:
                self.files += 1
            if self.before is not None:
                self.before(self.files)
        self.real(fd)


# -- writing -------------------------------------------------------------------------


def test_write_is_durable_before_the_inner_store_sees_it(
    make_spool: Callable[..., SpooledReportStore], spool_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsyncs = FsyncCounter(monkeypatch)
    inner = down()
    seen: list[tuple[str, bool, int]] = []

    def on_write(reports: Sequence[RunReport]) -> None:
        on_disk = {line["r"]["run_id"] for line in spooled_lines(spool_dir)}
        seen.extend((r.run_id, r.run_id in on_disk, fsyncs.files) for r in reports)

    inner.on_write = on_write
    spool = make_spool(inner)
    r = report(1)
    spool.write([r])
    # Returned: on disk, fsynced, whatever the inner store does.
    assert fsyncs.files >= 1
    assert [line["r"] for line in spooled_lines(spool_dir)] == [r.to_json()]
    assert isinstance(spooled_lines(spool_dir)[0]["t"], float)
    inner.error = None
    assert spool.flush(10)
    assert inner.stored == {r.run_id: r}
    assert seen and all(on_disk and files >= 1 for _, on_disk, files in seen)
    assert stat.S_IMODE(spool_dir.stat().st_mode) == 0o700


def test_delivered_to_a_real_sqlite_store_and_readable_back(
    make_spool: Callable[..., SpooledReportStore], tmp_path: Path
) -> None:
    inner = SQLiteReportStore(tmp_path / "reports.db")
    spool = make_spool(inner)
    assert spool.backend == "sqlite"
    reports = [report(i, stdout=f"line \u00e9 \udcff {i}\nsecond line") for i in range(5)]
    spool.write(reports[:3])
    spool.write(reports[3:])
    assert spool.flush(10)
    for r in reports:
        assert inner.get(r.run_id) == r
        assert spool.get(r.run_id) == r
    page = spool.list_runs(RunQuery(job_id="job", limit=10))
    assert [r.run_id for r in page.runs] == [r.run_id for r in reversed(reports)]
    assert spool.stats() == SpoolStats(0, 0, None, 0, "")
    assert waiting_files(tmp_path / "spool") == []
    status = spool.status()
    assert status.ok and status.backend == "sqlite"
    assert "0 reports spooled" in status.detail


def test_order_is_kept_and_the_last_version_of_a_run_wins(
    make_spool: Callable[..., SpooledReportStore],
) -> None:
    inner = down()
    spool = make_spool(inner, batch_size=3)
    written: list[RunReport] = []
    for w in range(20):
        if w == 12:
            r = report(5, RunState.FAILED, extra={"w": w})  # run 5 again, later version
        elif w == 8:
            r = report(7, RunState.FAILED, extra={"w": w})  # run 7 again, just after
        else:
            r = report(w, extra={"w": w})
        written.append(r)
        spool.write([r])
    inner.error = None
    assert spool.flush(10)
    arrivals = [r.extra["w"] for r in inner.delivered()]
    assert arrivals == sorted(arrivals)  # the order of writing (an older twin may be left out)
    assert inner.stored[report(5).run_id].state is RunState.FAILED
    assert inner.stored[report(5).run_id].extra == {"w": 12}
    assert inner.stored[report(7).run_id].extra == {"w": 8}
    assert set(inner.stored) == {r.run_id for r in written}
    assert all(len(b) <= 3 for b in inner.batches)


def test_delivery_goes_on_under_a_steady_stream_of_writes(
    make_spool: Callable[..., SpooledReportStore],
) -> None:
    # The sender seals the active segment while writers keep an fsync in flight nearly
    # all the time: it must get its turn, not wait for the writers to pause.
    inner = FakeInner()
    spool = make_spool(inner)
    stop = threading.Event()
    counter = iter(range(1_000_000))
    lock = threading.Lock()

    def writer() -> None:
        while not stop.is_set():
            with lock:
                i = next(counter)
            spool.write([report(i)])

    threads = [threading.Thread(target=writer) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(inner.delivered()) >= 200)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert spool.flush(10)
    assert len(inner.stored) == next(counter)


def test_first_delivery_is_prompt(make_spool: Callable[..., SpooledReportStore]) -> None:
    inner = FakeInner()
    spool = make_spool(inner)
    expected: list[RunReport] = []
    for i in range(3):
        r = report(i)
        expected.append(r)
        spool.write([r])
        written = time.monotonic()
        wait_until(lambda: inner.delivered() == expected, timeout=5)
        assert time.monotonic() - written < 0.5  # ~1 ms here; generous for a loaded machine


# -- outages and refusals ------------------------------------------------------------


def test_outage_reports_wait_then_all_arrive_in_order(
    make_spool: Callable[..., SpooledReportStore], spool_dir: Path
) -> None:
    inner = down()
    spool = make_spool(inner)
    written = [report(i) for i in range(30)]
    for r in written:
        spool.write([r])
    wait_until(lambda: spool.stats().last_error == "es down" and inner.calls >= 3)
    stats = spool.stats()
    assert stats.reports == 30
    assert stats.bytes == sum(p.stat().st_size for p in segment_files(spool_dir))
    assert stats.oldest_age_s is not None and stats.oldest_age_s < 30
    other = read_spool_stats(spool_dir)
    assert (other.reports, other.bytes, other.last_error) == (30, stats.bytes, "es down")
    status = spool.status()
    assert not status.ok
    assert "30 reports spooled, oldest" in status.detail and "es down" in status.detail
    assert spool.get(written[4].run_id) == written[4]  # from the spool: the inner store is down
    assert not spool.flush(0.1)
    inner.error = None
    assert spool.flush(10)
    assert [r.run_id for r in inner.delivered()] == [r.run_id for r in written]
    assert inner.stored == {r.run_id: r for r in written}
    assert spool.stats() == SpoolStats(0, 0, None, 0, "")
    assert read_spool_stats(spool_dir) == SpoolStats(0, 0, None, 0, "")


def test_unexpected_errors_are_retried_and_logged(
    make_spool: Callable[..., SpooledReportStore], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="distcrond.spool")
    inner = FakeInner()
    inner.error = RuntimeError("boom")
    spool = make_spool(inner)
    spool.write([report(1)])
    wait_until(lambda: spool.stats().last_error == "RuntimeError: boom")
    inner.error = None
    assert spool.flush(10)
    assert list(inner.stored) == [report(1).run_id]
    assert spool.stats().last_error == ""
    assert any("unexpected error" in r.message for r in caplog.records)


def test_refused_reports_go_to_the_dead_letters_and_can_be_replayed(
    make_spool: Callable[..., SpooledReportStore],
    spool_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="distcrond.spool")
    inner = FakeInner()
    written = [report(i) for i in range(6)]
    bad = {written[1].run_id: "mapper_parsing_exception: x", written[4].run_id: "too big"}
    inner.reject = dict(bad)
    spool = make_spool(inner)
    spool.write(written)
    assert spool.flush(10)
    assert set(inner.stored) == {r.run_id for r in written} - set(bad)
    letters = dead_letters(spool_dir)
    assert {x["run_id"]: x["reason"] for x in letters} == bad
    assert [x["r"] for x in letters] == [written[1].to_json(), written[4].to_json()]
    assert spool.stats().dead_letters == 2
    assert read_spool_stats(spool_dir).dead_letters == 2
    assert spool.stats().reports == 0 and spool.stats().last_error == ""
    errors = " ".join(r.message for r in caplog.records if r.levelno == logging.ERROR)
    assert written[1].run_id in errors and "too big" in errors
    # The operator fixes the cause and replays them, as the module docstring says.
    inner.reject = {}
    (spool_dir / DEAD_LETTERS).rename(spool_dir / segment_name(0))
    spool.flush(0.1)  # wakes the sender, which finds the new segment file
    wait_until(lambda: set(inner.stored) == {r.run_id for r in written})
    wait_until(lambda: not (spool_dir / segment_name(0)).exists())
    assert spool.stats().dead_letters == 0


def test_an_fsync_failure_fails_the_write(
    make_spool: Callable[..., SpooledReportStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = make_spool(down())
    fsyncs = FsyncCounter(monkeypatch)

    def fail(_: int) -> None:
        raise OSError(5, "Input/output error")

    fsyncs.before = fail
    with pytest.raises(StoreUnavailable, match="fsync failed"):
        spool.write([report(1)])
    fsyncs.before = None
    spool.write([report(2)])


# -- group commit --------------------------------------------------------------------


def test_concurrent_writers_share_fsyncs(
    make_spool: Callable[..., SpooledReportStore], spool_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = 32
    spool = make_spool(down())
    fsyncs = FsyncCounter(monkeypatch)

    def slow_disk(count: int) -> None:
        # The first fsync takes until every writer has appended: they must all be
        # covered by (at most) the next one, not each do its own.
        if count == 1:
            wait_until(lambda: complete_lines(spool_dir) >= n)

    fsyncs.before = slow_disk
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        barrier.wait()
        try:
            spool.write([report(i)])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert len(spooled_lines(spool_dir)) == n
    assert fsyncs.files < n
    assert fsyncs.files <= 4  # the first, the one covering the rest, maybe a rotation's


# -- restarts ------------------------------------------------------------------------


def test_a_closed_spool_keeps_its_reports_for_the_next_instance(
    make_spool: Callable[..., SpooledReportStore], spool_dir: Path
) -> None:
    first_inner = down()
    first = make_spool(first_inner)
    written = [report(i) for i in range(5)]
    for r in written:
        first.write([r])
    first.close()
    first.close()  # idempotent
    assert first_inner.closed
    with pytest.raises(StoreUnavailable):
        first.write([report(9)])
    assert [line["r"]["run_id"] for line in spooled_lines(spool_dir)] == [r.run_id for r in written]
    assert read_spool_stats(spool_dir).reports == 5

    inner = down()
    second = make_spool(inner)
    assert second.stats().reports == 5
    # Recovery asks for the report of a run left "running": it is still spooled.
    assert second.get(written[3].run_id) == written[3]
    later = report(7)
    second.write([later])
    inner.error = None
    assert second.flush(10)
    assert [r.run_id for r in inner.delivered()] == [r.run_id for r in [*written, later]]


def test_a_killed_process_leaves_a_spool_that_the_next_one_delivers(
    make_spool: Callable[..., SpooledReportStore], spool_dir: Path, tmp_path: Path
) -> None:
    script = tmp_path / "writer.py"
    script.write_text(
        f"""
import sys, time
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_spool import down, report
from distcrond.reporting.spool import SpooledReportStore
spool = SpooledReportStore(down(), Path({str(spool_dir)!r}), retry_initial=0.01, retry_max=0.05)
for i in range(20):
    spool.write([report(i)])
print("written", flush=True)
time.sleep(600)
"""
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "written"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert read_spool_stats(spool_dir).reports == 20
    inner = FakeInner()
    spool = make_spool(inner)  # the lock died with the process
    assert spool.flush(10)
    assert [r.run_id for r in inner.delivered()] == [report(i).run_id for i in range(20)]


@pytest.mark.parametrize(
    "tail",
    [b'{"t": 1764213000.0, "r": {"run_id": "job@2026', b'{"t": 1764213000.0, "r": {"ru\n'],
    ids=["no-newline", "invalid-json"],
)
def test_files_left_behind_torn_last_line_skipped_garbage_dead_lettered(
    make_spool: Callable[..., SpooledReportStore],
    spool_dir: Path,
    caplog: pytest.LogCaptureFixture,
    tail: bytes,
) -> None:
    caplog.set_level(logging.WARNING, logger="distcrond.spool")
    spool_dir.mkdir(mode=0o700)
    rs = [report(i) for i in range(5)]
    (spool_dir / segment_name(41)).write_bytes(
        spool_line(rs[0], 1.0)
        + spool_line(rs[1], 2.0)
        + b"not json at all\n"
        + spool_line(rs[2], 3.0)
    )
    (spool_dir / segment_name(42)).write_bytes(
        spool_line(rs[3], 4.0) + spool_line(rs[4], 5.0) + tail
    )
    assert read_spool_stats(spool_dir, now=10.0).oldest_age_s == 9.0
    inner = FakeInner()
    spool = make_spool(inner)
    assert spool.flush(10)
    assert [r.run_id for r in inner.delivered()] == [r.run_id for r in rs]
    letters = dead_letters(spool_dir)
    assert len(letters) == 1
    assert letters[0]["raw"] == "not json at all" and letters[0]["segment"] == segment_name(41)
    assert spool.stats().dead_letters == 1
    assert any("torn" in r.message or "invalid last line" in r.message for r in caplog.records)
    assert waiting_files(spool_dir) == []


# -- stats ---------------------------------------------------------------------------


def test_read_spool_stats_agrees_with_stats_and_progress_survives_a_restart(
    make_spool: Callable[..., SpooledReportStore], spool_dir: Path
) -> None:
    clock = FakeClock(T0)
    t0 = T0.timestamp()
    spool_dir.mkdir(mode=0o700)
    rs = [report(i) for i in range(4)]
    (spool_dir / segment_name(1)).write_bytes(
        b"".join(spool_line(r, t0 + 10 * i) for i, r in enumerate(rs))
    )
    inner = FakeInner()
    inner.healthy_calls = 1  # takes the first batch, then is down
    spool = make_spool(inner, batch_size=2, clock=clock)
    clock.advance(timedelta(seconds=40))
    late = report(9)
    spool.write([late])  # in the active segment, appended at t0 + 40
    clock.advance(timedelta(seconds=5))
    wait_until(lambda: read_spool_stats(spool_dir).last_error == "es down")
    assert [r.run_id for r in inner.delivered()] == [rs[0].run_id, rs[1].run_id]
    mine = spool.stats()
    other = read_spool_stats(spool_dir, now=t0 + 45)
    assert mine == other
    assert mine.reports == 3  # rs[2], rs[3], late
    assert mine.oldest_age_s == 25.0  # rs[2], appended at t0 + 20
    assert mine.last_error == "es down" and mine.dead_letters == 0
    assert mine.to_json() == {
        "reports": 3,
        "bytes": mine.bytes,
        "oldest_age_s": 25.0,
        "dead_letters": 0,
        "last_error": "es down",
    }
    spool.close()
    # The next instance resumes after the delivered batch (state.json's progress).
    inner2 = FakeInner()
    spool2 = make_spool(inner2)
    assert spool2.stats().reports == 3
    assert spool2.flush(10)
    assert [r.run_id for r in inner2.delivered()] == [rs[2].run_id, rs[3].run_id, late.run_id]
    assert read_spool_stats(spool_dir) == SpoolStats(0, 0, None, 0, "")


def test_read_spool_stats_of_a_missing_directory(tmp_path: Path) -> None:
    assert read_spool_stats(tmp_path / "nope") == SpoolStats(0, 0, None, 0, "")


# -- batching and segments -----------------------------------------------------------


def test_batches_respect_batch_size(make_spool: Callable[..., SpooledReportStore]) -> None:
    inner = down()
    spool = make_spool(inner, batch_size=7)
    written = [report(i) for i in range(50)]
    for r in written:
        spool.write([r])
    inner.error = None
    assert spool.flush(10)
    sizes = [len(b) for b in inner.batches]
    assert max(sizes) == 7 and sum(sizes) == 50
    assert [r.run_id for r in inner.delivered()] == [r.run_id for r in written]


def test_batches_respect_batch_bytes(make_spool: Callable[..., SpooledReportStore]) -> None:
    inner = down()
    spool = make_spool(inner, batch_bytes=4000)
    written = [report(i, stdout="x" * 1500) for i in range(9)] + [report(9, stdout="y" * 5000)]
    spool.write(written)  # one append: one segment
    inner.error = None
    assert spool.flush(10)
    sizes = [len(b) for b in inner.batches]
    assert sizes == [2, 2, 2, 2, 1, 1]  # a line of ~1.9 kB; the big one goes alone
    assert [r.run_id for r in inner.delivered()] == [r.run_id for r in written]


def test_a_large_active_segment_is_sealed(
    make_spool: Callable[..., SpooledReportStore],
    spool_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(spool_module, "SEGMENT_MAX_BYTES", 1000)  # about 2 lines
    inner = down()
    spool = make_spool(inner)
    written = [report(i) for i in range(12)]
    for r in written:
        spool.write([r])
    assert len(waiting_files(spool_dir)) >= 3
    assert spool.stats().reports == 12
    assert read_spool_stats(spool_dir).reports == 12
    assert read_spool_stats(spool_dir).bytes == spool.stats().bytes
    inner.error = None
    assert spool.flush(10)
    assert [r.run_id for r in inner.delivered()] == [r.run_id for r in written]
    assert waiting_files(spool_dir) == []


def test_one_store_per_directory(make_spool: Callable[..., SpooledReportStore]) -> None:
    make_spool()
    with pytest.raises(SpoolLocked):
        make_spool()
