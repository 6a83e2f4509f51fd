"""The state directory holds run output and secrets' hashes: 0700, its files 0600,
whatever the umask (distcrond.statedir), and the report database with its WAL too."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from distcrond.reporting.sqlite import SQLiteReportStore
from distcrond.runs import RunReport, RunState
from distcrond.statedir import private_dir, private_file

pytestmark = pytest.mark.timeout(10)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The daemon's umask is left as its jobs expect it, often 022."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_a_state_directory_is_made_private_new_or_existing(
    tmp_path: Path, open_umask: None
) -> None:
    made = private_dir(tmp_path / "new" / "state")
    assert mode(made) == 0o700
    existing = tmp_path / "old"
    existing.mkdir(mode=0o755)
    os.chmod(existing, 0o755)
    assert mode(private_dir(existing)) == 0o700


def test_a_state_file_is_made_private_new_or_existing_and_keeps_its_content(
    tmp_path: Path, open_umask: None
) -> None:
    assert mode(private_file(tmp_path / "new")) == 0o600
    old = tmp_path / "old"
    old.write_text("kept")
    os.chmod(old, 0o644)
    assert mode(private_file(old)) == 0o600
    assert old.read_text() == "kept"


def test_the_report_database_its_wal_and_shared_memory_are_private(
    tmp_path: Path, open_umask: None
) -> None:
    path = tmp_path / "reports.sqlite3"
    path.touch(mode=0o644)  # as an older version left it
    os.chmod(path, 0o644)
    store = SQLiteReportStore(path)
    try:
        at = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
        store.write(
            [
                RunReport(
                    run_id="backup@2026-12-07T12:00:00Z",
                    job_id="backup",
                    state=RunState.SUCCEEDED,
                    slot=at,
                    stdout="secret output",
                )
            ]
        )
        files = [path, *(path.with_name(path.name + s) for s in ("-wal", "-shm"))]
        assert all(f.exists() for f in files)
        assert {f.name: mode(f) for f in files} == {f.name: 0o600 for f in files}
    finally:
        store.close()
