"""The embedded report store: run reports in one SQLite file.

The daemon writes reports; the API workers read them, each through its own
instance on the same file (WAL: readers never wait for the writer). Listing is
a keyset walk over ``(slot_us DESC, run_id DESC)`` indexes, so a page costs the
same at row one or row one million.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from distcrond.coordination.base import StoreStatus, StoreUnavailable
from distcrond.reporting.base import (
    ReportStore,
    RunPage,
    RunQuery,
    decode_cursor,
    encode_cursor,
)
from distcrond.runs import RunReport, RunState
from distcrond.sqlitedb import SQLiteDatabase, to_us

SCHEMA_VERSION = 1
MAX_LIMIT = 1000

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS reports (
        run_id TEXT PRIMARY KEY,
        job_id TEXT NOT NULL,
        slot_us INTEGER NOT NULL,
        state TEXT NOT NULL,
        node_id TEXT,
        data TEXT NOT NULL           -- RunReport.to_json()
    )""",
    "CREATE INDEX IF NOT EXISTS reports_job_slot ON reports (job_id, slot_us DESC, run_id DESC)",
    "CREATE INDEX IF NOT EXISTS reports_job_state_slot "
    "ON reports (job_id, state, slot_us DESC, run_id DESC)",
    "CREATE INDEX IF NOT EXISTS reports_slot ON reports (slot_us DESC, run_id DESC)",
    "CREATE INDEX IF NOT EXISTS reports_node_slot ON reports (node_id, slot_us DESC, run_id DESC)",
    "CREATE INDEX IF NOT EXISTS reports_state_slot ON reports (state, slot_us DESC, run_id DESC)",
)


def _like_pattern(word: str) -> str:
    """A LIKE pattern (escape character backslash) matching ``word`` anywhere."""
    escaped = word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


class SQLiteReportStore(ReportStore):
    """Run reports in SQLite; thread-safe, and safe to open from several processes.

    Writes are WAL with synchronous=NORMAL, like the coordination store: a report
    survives a crash of any process once ``write`` returns; a power failure may lose
    the last commits of both files together (the run then ends ``unknown``). FULL
    would fsync every report, and runs finishing together would queue on it.
    """

    backend = "sqlite"

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._db = SQLiteDatabase(self.path, schema=_SCHEMA, version=SCHEMA_VERSION)

    def write(self, reports: Sequence[RunReport]) -> None:
        """Store the reports in one transaction; a report replaces the one with its run id."""
        # json.dumps escapes non-ASCII, so output decoded with surrogateescape (lone
        # surrogates, which SQLite's UTF-8 would refuse) is stored and read back as is.
        rows = [
            (
                r.run_id,
                r.job_id,
                to_us(r.slot),
                RunState(r.state).value,
                r.node_id,
                json.dumps(r.to_json()),
            )
            for r in reports
        ]
        if not rows:
            return
        with self._db.write() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO reports (run_id, job_id, slot_us, state, node_id, data) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )

    def get(self, run_id: str) -> RunReport | None:
        with self._db.connection() as conn:
            row = conn.execute("SELECT data FROM reports WHERE run_id = ?", (run_id,)).fetchone()
        return RunReport.from_json(json.loads(row[0])) if row else None

    def list_runs(self, query: RunQuery) -> RunPage:
        """Matching reports, newest slot first (ties: run id descending).

        ``limit`` is clamped to 1..1000. ``cursor`` is the ``next_cursor`` of the
        previous page (opaque; ValueError("invalid cursor") when malformed);
        ``next_cursor`` is None on the last page.
        """
        limit = min(max(int(query.limit), 1), MAX_LIMIT)
        where: list[str] = []
        params: list[Any] = []
        if query.job_id is not None:
            where.append("job_id = ?")
            params.append(query.job_id)
        if query.states:
            values = [RunState(s).value for s in query.states]
            where.append(f"state IN ({', '.join('?' * len(values))})")
            params.extend(values)
        if query.node_id is not None:
            where.append("node_id = ?")
            params.append(query.node_id)
        if query.since is not None:
            where.append("slot_us >= ?")
            params.append(to_us(query.since))
        if query.until is not None:
            where.append("slot_us < ?")
            params.append(to_us(query.until))
        for word in (query.text or "").split():
            # A substring of either stream, case-insensitive for ASCII (LIKE); a full scan
            # of the job's rows: the embedded store is for small installations.
            pattern = _like_pattern(word)
            where.append(
                "(json_extract(data, '$.stdout') LIKE ? ESCAPE '\\' "
                "OR json_extract(data, '$.stderr') LIKE ? ESCAPE '\\')"
            )
            params.extend([pattern, pattern])
        if query.cursor is not None:
            where.append("(slot_us, run_id) < (?, ?)")
            params.extend(decode_cursor(query.cursor))
        sql = "SELECT slot_us, run_id, data FROM reports"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY slot_us DESC, run_id DESC LIMIT ?"
        params.append(limit + 1)  # one more tells whether there is a next page
        with self._db.connection() as conn:
            rows = conn.execute(sql, params).fetchall()
        page = rows[:limit]
        next_cursor = encode_cursor(page[-1][0], page[-1][1]) if len(rows) > limit else None
        return RunPage(
            runs=[RunReport.from_json(json.loads(data)) for _, _, data in page],
            next_cursor=next_cursor,
        )

    def last_run(self, job_id: str) -> RunReport | None:
        """The report of the job's newest slot, if any."""
        page = self.list_runs(RunQuery(job_id=job_id, limit=1))
        return page.runs[0] if page.runs else None

    def status(self) -> StoreStatus:
        """ok when the file answers a query now; detail is its path (or the error)."""
        try:
            with self._db.connection() as conn:
                conn.execute("SELECT 1 FROM reports LIMIT 1").fetchall()
        except StoreUnavailable as exc:
            return StoreStatus(ok=False, backend=self.backend, detail=str(exc))
        return StoreStatus(ok=True, backend=self.backend, detail=str(self.path))

    def close(self) -> None:
        """Close the connections (idempotent)."""
        self._db.close()
