"""A durable on-disk spool in front of a report store (Elasticsearch, in practice).

The daemon's run threads hand their reports to :class:`SpooledReportStore`. ``write``
appends them to a file, fsyncs it and returns: it never waits for the inner store,
which may be down for minutes. A sender thread ("report-spool") delivers the files to
the inner store in bulk, in order, retrying through any outage.

Files
-----
All in the spool directory (created mode 0700; ``<state-dir>/report-spool`` for the
daemon).

* ``NNNNNNNNNNNNNNNNNNNN.ndjson`` (20 digits): the **segments**. Their name order is
  their order. One line per report, newline-delimited JSON, as written by
  ``json.dumps`` (ASCII: newlines and lone surrogates are escaped, so one report is
  exactly one line)::

      {"t": 1764213000.123456, "r": {"run_id": "backup@2026-11-27T03:10:00.000000Z", ...}}

  ``t`` is when the line was appended (unix seconds; ``oldest_age_s`` comes from it),
  ``r`` is :meth:`RunReport.to_json`. Other keys are ignored. The newest segment is
  the *active* one, the only one ever appended to; the others are sealed and never
  change. A new process never appends to a segment left by an old one: it starts a
  new one, numbered from the current time in microseconds (or after the highest
  found), so that a name is not reused across restarts. The active segment is sealed
  when the sender has delivered everything older (so the sender reads only sealed
  files, and deletes each one when it is through) or when it passes
  ``SEGMENT_MAX_BYTES`` (64 MiB).
* ``dead-letters.ndjson``: reports the inner store refused for good
  (:class:`ReportRejected`) and spool lines that could not be parsed, one JSON object
  per line: ``{"t", "r", "run_id", "reason", "dead_at", "segment"}`` for a refused
  report (``t`` and ``r`` as in a segment), ``{"t", "reason", "segment", "offset",
  "raw"}`` for an invalid line. Never dropped, never rotated: the operator's to keep.
  ``dead_letters`` in the stats is its number of lines.
* ``state.json``: ``{"last_error", "progress", "updated_at"}`` for other processes
  (the API workers' ``GET /api/v1/health`` and ``/metrics`` read it through
  :func:`read_spool_stats`): the last delivery error ("" when the last delivery
  worked) and the delivery progress inside a segment (``{"segment", "offset",
  "lines"}``, or null). Replaced atomically (tmp + rename) when it changes, not
  fsynced: it is advice, and a lost or stale one only means re-sending more.
* ``lock``: flock'ed by the process that owns the spool (a second one gets
  :class:`SpoolLocked`); released by the kernel when that process dies.

Guarantees
----------
* **Durable when write returns**: the lines are fsynced (group commit: writers that
  arrive while an fsync is running share the next one). A new segment's directory
  entry is fsynced before anybody appends to it, and the directory again after a
  segment is deleted.
* **At-least-once delivery**: a segment is deleted only once every line of it was
  accepted by the inner store (or dead-lettered). A crash may re-send the last batch
  (or, if ``state.json`` was lost, the whole segment). Re-sending is harmless only
  because the inner store keys reports by run id (the ``ReportStore`` contract).
* **Order**: segments are delivered oldest name first, lines in file order, a batch
  (at most ``batch_size`` reports and ``batch_bytes`` bytes; a larger single report
  goes alone) at a time, the next batch only when the previous one was accepted. A
  run id written twice in one batch is sent once, as its later version; so the inner
  store ends with the version written last.
* **Outage**: ``StoreUnavailable`` (or any unexpected error, logged) from the inner
  store -> the same batch again after a backoff doubling from ``retry_initial`` to
  ``retry_max``, forever. Nothing is dropped; ``stats().last_error`` tells why.
* **Refused for good**: ``ReportRejected`` -> those reports go to the dead-letter file
  (fsynced), an error names them; the rest of the batch was stored (per the contract).
* **Progress** inside a segment is kept in memory and, after each batch that leaves
  the segment unfinished, in ``state.json`` (cleared before the segment is deleted).
* **Restart**: segments found at start are delivered first, in order, resuming at
  ``state.json``'s progress when it names one of them at a line boundary. A torn
  last line (the process died while appending: no trailing newline, or invalid JSON
  as the very last line of the newest segment found at start) is skipped with a
  warning: its ``write`` never returned. Any other invalid line is dead-lettered.
* **Reads**: ``get`` answers a report that is still spooled (its latest spooled
  version, read back from its segment; an index of run id -> place is kept in
  memory) and otherwise asks the inner store: recovery after a restart asks for the
  report of a run whose record was left ``running``, and it may still be waiting
  here. ``list_runs`` only asks the inner store: a spooled report is listed once
  delivered.

Operating it
------------
* ``GET /api/v1/health`` (``report_spool``) and ``/metrics``
  (``distcron_report_spool_*``) show what waits, the oldest age, the dead letters and
  the last error. Reports waiting while Elasticsearch is up means it refuses them
  for a reason a retry cannot cure by itself (401/403, a template conflict...): see
  ``last_error`` and the daemon's log.
* Disk: the spool grows by the size of the reports written during an outage.
* Dead letters stay in ``dead-letters.ndjson`` until the operator acts (fix the
  mapping, the report...). To replay them, move the file to an unused segment name
  that sorts first, e.g. ``mv dead-letters.ndjson 00000000000000000000.ndjson`` in
  the spool directory (the daemon may be running: it picks up new segment files when
  it has nothing else to deliver, or at its next start). Refused again, they come
  back. (A replayed report replaces the run's report in the store, even a newer one.)
* Never edit the active segment by hand; deleting a sealed segment drops its reports.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distcrond.clock import Clock
from distcrond.coordination.base import StoreStatus, StoreUnavailable
from distcrond.reporting.base import ReportRejected, ReportStore, RunPage, RunQuery
from distcrond.runs import RunReport
from distcrond.statedir import private_dir

log = logging.getLogger("distcrond.spool")

DEAD_LETTERS = "dead-letters.ndjson"
STATE_FILE = "state.json"
LOCK_FILE = "lock"
SEGMENT_SUFFIX = ".ndjson"
# The active segment is sealed by a writer once it passes this size (the sender also
# seals it, whatever its size, when it has delivered everything older).
SEGMENT_MAX_BYTES = 64 * 1024 * 1024
CLOSE_PATIENCE = 2.0  # close(): how long the sender may still deliver
IDLE_RESCAN = 5.0  # an idle sender looks for segment files dropped in by an operator

_SEGMENT_RE = re.compile(r"^(\d{20})\.ndjson$")
_T_RE = re.compile(rb'^\{"t": (-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)[,}]')
_RUN_ID_RE = re.compile(rb'^\{"t": [^,]*, "r": \{"run_id": ("(?:[^"\\]|\\.)*")')


class SpoolLocked(Exception):
    """Another SpooledReportStore (in this or another process) holds the spool."""


@dataclass(frozen=True)
class SpoolStats:
    reports: int  # reports waiting (not yet accepted by the inner store)
    bytes: int  # bytes of spool files waiting
    oldest_age_s: float | None  # age of the oldest waiting report (None when empty)
    dead_letters: int  # reports refused for good (kept in a file, never dropped)
    last_error: str  # the last delivery error, "" when the last delivery worked

    def to_json(self) -> dict[str, Any]:
        return {
            "reports": self.reports,
            "bytes": self.bytes,
            "oldest_age_s": self.oldest_age_s,
            "dead_letters": self.dead_letters,
            "last_error": self.last_error,
        }


# -- file helpers, shared by the store and read_spool_stats ---------------------------


def segment_name(seq: int) -> str:
    return f"{seq:020d}{SEGMENT_SUFFIX}"


def _fsync_dir(directory: Path) -> None:
    """Make the directory's entries (created, renamed, deleted files) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # a file system that cannot fsync directories
            raise
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> int:
    """Write all of ``data`` (os.write may write less); the count written, or OSError
    with ``written`` set to what was written before the error."""
    view = memoryview(data)
    written = 0
    try:
        while written < len(data):
            written += os.write(fd, view[written:])
    except OSError as exc:
        exc.written = written  # type: ignore[attr-defined]
        raise
    return written


def _line_t(raw: bytes) -> float | None:
    """The append time of a spool line, None when it has none (or is not JSON)."""
    m = _T_RE.match(raw)
    if m:
        return float(m.group(1))
    try:
        value = json.loads(raw)["t"]
    except Exception:
        return None
    return float(value) if isinstance(value, int | float) else None


def _line_run_id(raw: bytes) -> str | None:
    m = _RUN_ID_RE.match(raw)
    try:
        value = json.loads(m.group(1)) if m else json.loads(raw)["r"]["run_id"]
    except Exception:
        return None
    return value if isinstance(value, str) else None


def _first_t(path: Path, offset: int) -> float | None:
    """The append time of the first line at or after ``offset`` that has one."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            while True:
                head = f.read(64)
                if not head:
                    return None
                m = _T_RE.match(head)
                if m:
                    return float(m.group(1))
                f.seek(offset)
                raw = f.readline()
                t = _line_t(raw)
                if t is not None:
                    return t
                offset += len(raw)
    except OSError:
        return None


_count_lock = threading.Lock()
# path -> (st_dev, st_ino, bytes counted, newlines in them): files only grow (segments
# are append-only, so is the dead-letter file), so a count continues where it stopped.
_count_cache: dict[str, tuple[int, int, int, int]] = {}


def _count_lines(path: Path) -> tuple[int, int]:
    """(newlines, size) of a file, counted incrementally; (0, 0) when it is missing."""
    key = str(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return 0, 0
    with _count_lock:
        cached = _count_cache.get(key)
    start = lines = 0
    if cached and cached[:2] == (st.st_dev, st.st_ino) and cached[2] <= st.st_size:
        start, lines = cached[2], cached[3]
    if start < st.st_size:
        try:
            with open(path, "rb") as f:
                f.seek(start)
                while start < st.st_size:
                    chunk = f.read(min(1 << 20, st.st_size - start))
                    if not chunk:
                        break
                    lines += chunk.count(b"\n")
                    start += len(chunk)
        except FileNotFoundError:
            return 0, 0
    with _count_lock:
        _count_cache[key] = (st.st_dev, st.st_ino, start, lines)
    return lines, start


def _forget_counts(directory: Path, keep: set[str]) -> None:
    prefix = str(directory) + os.sep
    with _count_lock:
        for key in [k for k in _count_cache if k.startswith(prefix) and k not in keep]:
            del _count_cache[key]


def _read_state(directory: Path) -> dict[str, Any]:
    try:
        data = json.loads((directory / STATE_FILE).read_bytes())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _valid_progress(state: dict[str, Any]) -> tuple[str, int, int] | None:
    p = state.get("progress")
    if not isinstance(p, dict):
        return None
    name, offset, lines = p.get("segment"), p.get("offset"), p.get("lines")
    if not isinstance(name, str) or not isinstance(offset, int) or not isinstance(lines, int):
        return None
    return (name, offset, lines) if offset >= 0 and lines >= 0 else None


def read_spool_stats(directory: Path, now: float | None = None) -> SpoolStats:
    """Stats from the files alone — callable from ANOTHER process (the API workers run in
    gunicorn worker processes and show them in GET /api/v1/health and /metrics).

    Counts the newlines of the segments (incrementally: a file is read once, then only
    what was appended since), subtracts the progress that ``state.json`` records, and
    reads the first waiting line of each segment for its append time. A directory that
    does not exist is an empty spool.
    """
    directory = Path(directory)
    now = time.time() if now is None else now
    try:
        names = sorted(n for n in os.listdir(directory) if _SEGMENT_RE.match(n))
    except FileNotFoundError:
        return SpoolStats(0, 0, None, 0, "")
    state = _read_state(directory)
    progress = _valid_progress(state)
    reports = size = 0
    oldest: float | None = None
    seen: set[str] = set()
    for name in names:
        path = directory / name
        lines, nbytes = _count_lines(path)
        seen.add(str(path))
        done_bytes = done_lines = 0
        if progress and progress[0] == name and progress[1] <= nbytes:
            done_bytes, done_lines = progress[1], min(progress[2], lines)
        reports += lines - done_lines
        size += nbytes - done_bytes
        if lines > done_lines:
            t = _first_t(path, done_bytes)
            if t is not None and (oldest is None or t < oldest):
                oldest = t
    dead_path = directory / DEAD_LETTERS
    dead, _ = _count_lines(dead_path)
    seen.add(str(dead_path))
    _forget_counts(directory, seen)
    return SpoolStats(
        reports=reports,
        bytes=size,
        oldest_age_s=max(0.0, now - oldest) if oldest is not None else None,
        dead_letters=dead,
        last_error=str(state.get("last_error") or ""),
    )


# -- the store ------------------------------------------------------------------------


@dataclass(eq=False)
class _Segment:
    seq: int
    path: Path
    size: int = 0  # bytes in the file
    lines: int = 0  # newline-terminated lines in the file
    first_t: float | None = None  # append time of its first line
    done_bytes: int = 0  # delivery progress (sealed segments only)
    done_lines: int = 0
    next_t: float | None = None  # append time of the first line after the progress

    @property
    def waiting_t(self) -> float | None:
        if self.lines <= self.done_lines:
            return None
        return self.next_t if self.done_bytes else self.first_t


@dataclass(eq=False)
class _Ticket:
    """One write waiting for an fsync that covers its bytes."""

    done: bool = False
    error: BaseException | None = None


@dataclass
class _Scan:
    size: int = 0
    lines: int = 0
    lines_before: int = 0  # lines ending at or before the skipped offset
    first_t: float | None = None  # first append time after it
    entries: list[tuple[str, int, int]] = field(default_factory=list)  # run id, offset, length


def _scan_segment(path: Path, skip_to: int = 0) -> _Scan:
    scan = _Scan()
    pos = 0
    with open(path, "rb") as f:
        for raw in iter(f.readline, b""):
            if raw.endswith(b"\n"):
                scan.lines += 1
                if pos < skip_to:
                    scan.lines_before += 1
                else:
                    if scan.first_t is None:
                        scan.first_t = _line_t(raw)
                    run_id = _line_run_id(raw)
                    if run_id is not None:
                        scan.entries.append((run_id, pos, len(raw)))
            pos += len(raw)
    scan.size = pos
    return scan


class SpooledReportStore(ReportStore):
    """A ReportStore whose ``write`` is an fsynced append to a local spool, delivered to
    ``inner`` by a background thread (see the module docstring for the guarantees).

    ``get`` answers reports still in the spool from the spool (their latest version);
    ``list_runs`` and everything else go to ``inner``. Thread-safe. ``write`` raises
    StoreUnavailable when the spool cannot append or fsync (disk full, I/O error: the
    caller retries, as for any store) and once ``close`` has begun.
    """

    def __init__(
        self,
        inner: ReportStore,
        directory: Path,
        *,
        batch_size: int = 500,
        batch_bytes: int = 8 * 1024 * 1024,
        retry_initial: float = 0.2,
        retry_max: float = 10.0,
        clock: Clock | None = None,
    ) -> None:
        if batch_size < 1 or batch_bytes < 1:
            raise ValueError("batch_size and batch_bytes must be positive")
        self._inner = inner
        self.backend = inner.backend
        self.directory = Path(directory)
        self._batch_size = batch_size
        self._batch_bytes = batch_bytes
        self._retry_initial = max(retry_initial, 0.001)
        self._retry_max = max(retry_max, self._retry_initial)
        self._clock = clock or Clock()

        self._cond = threading.Condition()
        self._rotate_lock = threading.Lock()  # rotations and adoptions, one at a time
        self._sealed: list[_Segment] = []  # by seq; the sender delivers the first one
        self._active: _Segment
        self._fd: int | None = None  # the active segment, O_APPEND; None once closed
        self._tail_dirty = False  # a failed append left a partial line that no fsync fixed
        self._pending: list[_Ticket] = []  # appended, waiting for an fsync
        self._syncing = False  # an fsync of the active fd is in progress
        self._rotating = False  # a rotation waits for that fsync: no new one may start
        self._index: dict[str, tuple[int, int, int]] = {}  # run id -> seq, offset, length
        self._closing = False
        self._last_error = ""
        self._saved_progress: dict[str, Any] | None = None  # as in state.json
        self._last_inherited_seq: int | None = None

        self._wake = threading.Event()  # new work (writes, flush, close)
        self._interrupt = threading.Event()  # close: cut a backoff short
        self._stop = threading.Event()  # close: the sender's time is up
        self._lock_fd = self._lock_directory()
        try:
            self._load()
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._thread = threading.Thread(target=self._run, name="report-spool", daemon=True)
        self._thread.start()

    # -- start ---------------------------------------------------------------------
    def _lock_directory(self) -> int:
        if not self.directory.is_dir():
            private_dir(self.directory)
            _fsync_dir(self.directory.parent)
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise SpoolLocked(f"report spool {self.directory} is in use by another store") from None
        return fd

    def _load(self) -> None:
        """Take over the segments left by previous processes, then open a new active one."""
        state = _read_state(self.directory)
        self._last_error = str(state.get("last_error") or "")
        progress = _valid_progress(state)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.directory / (STATE_FILE + ".tmp"))
        found = sorted(
            int(m.group(1)) for n in os.listdir(self.directory) if (m := _SEGMENT_RE.match(n))
        )
        for seq in found:
            path = self.directory / segment_name(seq)
            skip = 0
            if progress and progress[0] == path.name and self._at_line_boundary(path, progress[1]):
                skip = progress[1]
                self._saved_progress = {"segment": path.name, "offset": skip, "lines": 0}
            self._adopt(seq, path, skip)
        if found:
            self._last_inherited_seq = found[-1]
            waiting = sum(s.lines - s.done_lines for s in self._sealed)
            log.info(
                "report spool %s: %d report(s) left by a previous process, in %d segment(s)",
                self.directory,
                waiting,
                len(found),
            )
        first = max(found[-1] + 1 if found else 1, time.time_ns() // 1000)
        self._fd, self._active = self._create_segment(first)

    @staticmethod
    def _at_line_boundary(path: Path, offset: int) -> bool:
        if offset <= 0:
            return False
        try:
            with open(path, "rb") as f:
                if offset > os.fstat(f.fileno()).st_size:
                    return False
                f.seek(offset - 1)
                return f.read(1) == b"\n"
        except OSError:
            return False

    def _adopt(self, seq: int, path: Path, skip: int = 0) -> None:
        """Add a segment file this process did not write (left at start, or an operator's)."""
        scan = _scan_segment(path, skip)
        seg = _Segment(seq=seq, path=path, size=scan.size, lines=scan.lines)
        seg.first_t = scan.first_t
        if skip:
            seg.done_bytes, seg.done_lines, seg.next_t = skip, scan.lines_before, scan.first_t
            if self._saved_progress is not None:
                self._saved_progress["lines"] = scan.lines_before
        with self._cond:
            self._sealed.append(seg)
            self._sealed.sort(key=lambda s: s.seq)
            for run_id, offset, length in scan.entries:
                self._index[run_id] = (seq, offset, length)

    def _create_segment(self, seq: int) -> tuple[int, _Segment]:
        """A new empty segment (the first free name from ``seq``), its entry fsynced."""
        while True:
            path = self.directory / segment_name(seq)
            try:
                fd = os.open(
                    path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
                )
                break
            except FileExistsError:
                seq += 1
        try:
            _fsync_dir(self.directory)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        return fd, _Segment(seq=seq, path=path)

    # -- ReportStore -----------------------------------------------------------------
    def write(self, reports: Sequence[RunReport]) -> None:
        """Append the reports to the spool and return once they are fsynced.

        Never waits for the inner store. Writers that arrive while an fsync runs wait
        for the next one, which covers them all (group commit).
        """
        batch = list(reports)
        if not batch:
            return
        t = round(self._clock.now().timestamp(), 6)
        lines = [
            (r.run_id, (json.dumps({"t": t, "r": r.to_json()}) + "\n").encode("ascii"))
            for r in batch
        ]
        ticket = _Ticket()
        with self._cond:
            if self._closing or self._fd is None:
                raise StoreUnavailable(f"report spool {self.directory} is closed")
            self._append(lines, t)
            self._pending.append(ticket)
        self._await_fsync(ticket)
        self._wake.set()
        if ticket.error is not None:
            raise StoreUnavailable(
                f"report spool {self.directory}: fsync failed: {ticket.error}"
            ) from ticket.error
        if self._active.size >= SEGMENT_MAX_BYTES:
            self._rotate(lambda seg: seg.size >= SEGMENT_MAX_BYTES, blocking=False)

    def _append(self, lines: list[tuple[str, bytes]], t: float) -> None:
        """Append to the active segment (the caller holds the condition)."""
        seg, fd = self._active, self._fd
        assert fd is not None
        offset = seg.size
        prefix = b"\n" if self._tail_dirty else b""
        payload = prefix + b"".join(line for _, line in lines)
        try:
            _write_all(fd, payload)
        except OSError as exc:
            written = getattr(exc, "written", 0)
            try:
                os.ftruncate(fd, offset)
            except OSError:
                # The partial bytes stay: end them with a newline at the next append, so
                # that they become one invalid line (dead-lettered), not part of a report.
                seg.size = offset + written
                seg.lines += payload[:written].count(b"\n")
                self._tail_dirty = self._tail_dirty if not written else payload[written - 1] != 10
            raise StoreUnavailable(f"report spool {self.directory}: cannot append: {exc}") from exc
        if prefix:
            self._tail_dirty = False
            seg.lines += 1
            offset += 1
        for run_id, line in lines:
            self._index[run_id] = (seg.seq, offset, len(line))
            offset += len(line)
        seg.size = offset
        seg.lines += len(lines)
        if seg.first_t is None:
            seg.first_t = t

    def _await_fsync(self, ticket: _Ticket) -> None:
        """Wait until an fsync covers the ticket's bytes, doing it when nobody else is."""
        while True:
            with self._cond:
                while (self._syncing or self._rotating) and not ticket.done:
                    self._cond.wait()
                if ticket.done:
                    return
                group, self._pending = self._pending, []
                fd = self._fd
                self._syncing = True
            error: BaseException | None = None
            try:
                assert fd is not None  # close() waits for pending tickets
                os.fsync(fd)
            except Exception as exc:
                error = exc
            finally:
                with self._cond:
                    for t in group:
                        t.done, t.error = True, error
                    self._syncing = False
                    self._cond.notify_all()

    def get(self, run_id: str) -> RunReport | None:
        """The report's latest spooled version if it is still in the spool, else the inner
        store's answer."""
        with self._cond:
            where = self._index.get(run_id)
        if where is not None:
            seq, offset, length = where
            try:
                with open(self.directory / segment_name(seq), "rb") as f:
                    f.seek(offset)
                    raw = f.read(length)
                return RunReport.from_json(json.loads(raw)["r"])
            except Exception:
                pass  # delivered and deleted meanwhile, or unreadable: ask the inner store
        return self._inner.get(run_id)

    def list_runs(self, query: RunQuery) -> RunPage:
        """The inner store's answer: spooled reports are listed once delivered."""
        return self._inner.list_runs(query)

    def status(self) -> StoreStatus:
        """The inner store's status; the detail adds what waits in the spool."""
        try:
            inner = self._inner.status()
        except Exception as exc:
            inner = StoreStatus(ok=False, backend=self.backend, detail=f"status failed: {exc}")
        s = self.stats()
        spool = f"{s.reports} reports spooled"
        if s.oldest_age_s is not None:
            spool += f", oldest {s.oldest_age_s:.0f}s"
        if s.dead_letters:
            spool += f", {s.dead_letters} dead letters in {self.directory / DEAD_LETTERS}"
        if s.last_error:
            spool += f", last delivery error: {s.last_error}"
        detail = f"{inner.detail}; {spool}" if inner.detail else spool
        return StoreStatus(ok=inner.ok, backend=inner.backend, detail=detail)

    def stats(self) -> SpoolStats:
        """What waits, from memory (``dead_letters`` counts the dead-letter file's lines);
        agrees with :func:`read_spool_stats` on the same directory."""
        with self._cond:
            segments = [*self._sealed, self._active]
            reports = sum(s.lines - s.done_lines for s in segments)
            size = sum(s.size - s.done_bytes for s in segments)
            times = [t for s in segments if (t := s.waiting_t) is not None]
            last_error = self._last_error
        dead, _ = _count_lines(self.directory / DEAD_LETTERS)
        oldest = min(times) if times else None
        now = self._clock.now().timestamp()
        return SpoolStats(
            reports=reports,
            bytes=size,
            oldest_age_s=max(0.0, now - oldest) if oldest is not None else None,
            dead_letters=dead,
            last_error=last_error,
        )

    def flush(self, timeout: float) -> bool:
        """Wait until everything written so far was delivered (or dead-lettered) and its
        segments deleted; True if so within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            older = {s.seq for s in self._sealed}
            target, target_lines = self._active.seq, self._active.lines
        self._wake.set()

        def flushed() -> bool:  # every segment that held them delivered and deleted
            if self._active.seq == target and target_lines:
                return False
            return not any(s.seq in older or s.seq == target for s in self._sealed)

        with self._cond:
            while not flushed():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._thread.is_alive():
                    return False
                self._cond.wait(min(remaining, 0.1))
            return True

    def close(self) -> None:
        """Stop the sender (it may deliver for up to CLOSE_PATIENCE seconds more), close
        the inner store. Idempotent. Undelivered reports stay on disk for the next start."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
        self._wake.set()
        self._interrupt.set()
        self._thread.join(CLOSE_PATIENCE)
        self._stop.set()
        self._thread.join(1.0)
        if self._thread.is_alive():
            log.warning("report spool %s: the sender did not stop in time", self.directory)
        with self._rotate_lock, self._cond:
            while self._syncing or self._pending:
                self._cond.wait()
            fd, self._fd = self._fd, None
            active = self._active
            self._cond.notify_all()
        if fd is not None:
            os.close(fd)
        if active.size == 0:
            with contextlib.suppress(OSError):
                os.unlink(active.path)
                _fsync_dir(self.directory)
        waiting = self.stats().reports
        if waiting:
            log.info(
                "report spool %s: %d report(s) left for the next start", self.directory, waiting
            )
        os.close(self._lock_fd)
        self._inner.close()

    # -- rotation ------------------------------------------------------------------
    def _rotate(self, wanted: Callable[[_Segment], bool], *, blocking: bool) -> bool:
        """Seal the active segment (if ``wanted(active)``) and open a new one."""
        if not self._rotate_lock.acquire(blocking=blocking):
            return False
        try:
            with self._cond:
                if self._fd is None or not wanted(self._active):
                    return False
                seq = max(s.seq for s in [*self._sealed, self._active]) + 1
            fd, seg = self._create_segment(seq)  # no lock held: writers go on
            with self._cond:
                # Wait for the fsync in flight, and let no writer start another one
                # meanwhile: under a steady stream of writes there would always be one.
                self._rotating = True
                try:
                    while self._syncing:
                        self._cond.wait()
                finally:
                    self._rotating = False
                if self._fd is None:  # closed meanwhile
                    self._cond.notify_all()
                    os.close(fd)
                    with contextlib.suppress(OSError):
                        os.unlink(seg.path)
                    return False
                # Lead the fsync of the old segment: the pending tickets' bytes are in it.
                group, self._pending = self._pending, []
                old_fd, self._fd = self._fd, fd
                self._sealed.append(self._active)
                self._sealed.sort(key=lambda s: s.seq)
                self._active = seg
                self._tail_dirty = False
                self._syncing = True
            error: BaseException | None = None
            try:
                os.fsync(old_fd)
            except Exception as exc:
                error = exc
                log.error("report spool %s: fsync failed: %s", self.directory, exc)
            finally:
                with contextlib.suppress(OSError):
                    os.close(old_fd)
                with self._cond:
                    for t in group:
                        t.done, t.error = True, error
                    self._syncing = False
                    self._cond.notify_all()
            return True
        finally:
            self._rotate_lock.release()

    def _adopt_new_files(self) -> None:
        """Take segment files that appeared in the directory (an operator's replay)."""
        with self._rotate_lock:
            with self._cond:
                known = {s.seq for s in self._sealed} | {self._active.seq}
            for name in sorted(os.listdir(self.directory)):
                m = _SEGMENT_RE.match(name)
                if m and int(m.group(1)) not in known:
                    log.info("report spool %s: new segment file %s", self.directory, name)
                    self._adopt(int(m.group(1)), self.directory / name)

    # -- the sender ------------------------------------------------------------------
    def _run(self) -> None:
        delay = self._retry_initial
        while not self._stop.is_set():
            self._wake.clear()
            try:
                seg = self._next_segment()
                if seg is None:
                    if self._rotate(lambda s: s.size > 0, blocking=True):
                        continue
                    if self._closing:
                        return
                    self._wake.wait(IDLE_RESCAN)
                    continue
                if not self._deliver(seg):
                    return
                delay = self._retry_initial
            except Exception as exc:
                log.exception("report spool %s: sender error; retrying", self.directory)
                self._set_error(f"spool: {exc}")
                if self._closing:
                    return
                self._clock.wait(self._interrupt, delay)
                delay = min(delay * 2, self._retry_max)

    def _next_segment(self) -> _Segment | None:
        with self._cond:
            if self._sealed:
                return self._sealed[0]
        self._adopt_new_files()
        with self._cond:
            return self._sealed[0] if self._sealed else None

    def _deliver(self, seg: _Segment) -> bool:
        """Deliver a sealed segment from its progress on, then delete it; False if stopped."""
        if not seg.path.exists():
            log.error("report spool %s: segment %s vanished", self.directory, seg.path.name)
            self._drop(seg)
            return True
        with open(seg.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            pos = seg.done_bytes
            f.seek(pos)
            carry: bytes | None = None
            while True:
                batch: list[tuple[int, bytes]] = []
                nbytes = 0
                while True:
                    if carry is None:
                        carry = f.readline() or None
                        if carry is None:
                            break
                    full = len(batch) >= self._batch_size
                    if batch and (full or nbytes + len(carry) > self._batch_bytes):
                        break
                    batch.append((pos, carry))
                    pos += len(carry)
                    nbytes += len(carry)
                    carry = None
                if not batch:
                    break
                if not self._deliver_batch(seg, batch, size):
                    return False
                next_t = _line_t(carry) if carry is not None else None
                if next_t is None and pos < size:
                    next_t = _first_t(seg.path, pos)
                with self._cond:
                    seg.done_bytes = pos
                    seg.done_lines += sum(1 for _, raw in batch if raw.endswith(b"\n"))
                    seg.next_t = next_t
                    self._cond.notify_all()
                if pos < size:
                    progress = {"segment": seg.path.name, "offset": pos, "lines": seg.done_lines}
                    self._save_state(progress)
        if self._saved_progress is not None:
            self._save_state(None)  # before the unlink: progress never names a dead file
        with contextlib.suppress(FileNotFoundError):
            os.unlink(seg.path)
        _fsync_dir(self.directory)
        self._drop(seg)
        return True

    def _drop(self, seg: _Segment) -> None:
        with self._cond:
            self._sealed = [s for s in self._sealed if s is not seg]
            if self._index:
                self._index = {k: v for k, v in self._index.items() if v[0] != seg.seq}
            self._cond.notify_all()

    def _deliver_batch(self, seg: _Segment, batch: list[tuple[int, bytes]], size: int) -> bool:
        """Parse, send (retrying), dead-letter what must be; False if stopped."""
        good: list[tuple[dict[str, Any], RunReport]] = []
        dead: list[dict[str, Any]] = []
        now = round(self._clock.now().timestamp(), 6)
        for offset, raw in batch:
            if not raw.endswith(b"\n"):
                log.warning(
                    "report spool: %s: skipping a torn last line at byte %d (%d bytes, no "
                    "newline: the process died while appending it)",
                    seg.path,
                    offset,
                    len(raw),
                )
                continue
            try:
                data = json.loads(raw)
                report = RunReport.from_json(data["r"])
            except Exception as exc:
                if seg.seq == self._last_inherited_seq and offset + len(raw) >= size:
                    log.warning(
                        "report spool: %s: skipping an invalid last line at byte %d (the "
                        "process died while appending it): %s",
                        seg.path,
                        offset,
                        exc,
                    )
                    continue
                reason = f"invalid spool line: {type(exc).__name__}: {exc}"
                log.error(
                    "report spool: %s: invalid line at byte %d, kept in %s: %s",
                    seg.path,
                    offset,
                    DEAD_LETTERS,
                    reason,
                )
                dead.append(
                    {
                        "t": now,
                        "reason": reason,
                        "segment": seg.path.name,
                        "offset": offset,
                        "raw": raw[:-1].decode("utf-8", "surrogateescape"),
                    }
                )
                continue
            good.append((data, report))
        # A run id twice in one batch: send its later version only (the last one wins
        # whatever the inner store does with duplicates inside one bulk request).
        last = {report.run_id: i for i, (_, report) in enumerate(good)}
        to_send = [g for i, g in enumerate(good) if last[g[1].run_id] == i]
        rejected = self._send([report for _, report in to_send])
        if rejected is None:
            return False
        if rejected:
            refused = []
            for data, report in to_send:
                if report.run_id in rejected:
                    reason = rejected.pop(report.run_id)
                    refused.append(f"{report.run_id}: {reason}")
                    dead.append(
                        {
                            "t": data.get("t"),
                            "r": data["r"],
                            "run_id": report.run_id,
                            "reason": reason,
                            "dead_at": now,
                            "segment": seg.path.name,
                        }
                    )
            log.error(
                "report spool: the %s store refused %d report(s) for good, kept in %s: %s",
                self.backend,
                len(refused),
                self.directory / DEAD_LETTERS,
                "; ".join(refused),
            )
            if rejected:
                log.error("report spool: refusals of run ids not in the batch: %s", rejected)
        if dead:
            self._dead_letter(dead)
        return True

    def _send(self, reports: list[RunReport]) -> dict[str, str] | None:
        """Write to the inner store until it takes the batch: {} when all were stored, the
        refused ones (run id -> reason), or None when the sender must stop."""
        if not reports:
            return {}
        delay = self._retry_initial
        while True:
            if self._stop.is_set():
                return None
            try:
                self._inner.write(reports)
            except ReportRejected as exc:
                self._set_error("")
                return dict(exc.rejected)
            except StoreUnavailable as exc:
                error = str(exc) or type(exc).__name__
                if error != self._last_error:
                    log.warning(
                        "report spool: the %s store is unavailable (%s); %d report(s) wait, "
                        "retrying",
                        self.backend,
                        error,
                        len(reports),
                    )
                self._set_error(error)
            except Exception as exc:
                log.exception("report spool: unexpected error from the %s store", self.backend)
                self._set_error(f"{type(exc).__name__}: {exc}")
            else:
                if self._last_error:
                    log.info("report spool: delivering to the %s store again", self.backend)
                self._set_error("")
                return {}
            if self._closing:
                return None  # close(): the sender had its chance
            self._clock.wait(self._interrupt, delay)
            delay = min(delay * 2, self._retry_max)

    def _dead_letter(self, entries: list[dict[str, Any]]) -> None:
        path = self.directory / DEAD_LETTERS
        data = b"".join(json.dumps(e).encode("ascii") + b"\n" for e in entries)
        created = not path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            _fsync_dir(self.directory)

    def _set_error(self, error: str) -> None:
        with self._cond:
            if error == self._last_error:
                return
            self._last_error = error
        self._save_state(self._saved_progress)

    def _save_state(self, progress: dict[str, Any] | None) -> None:
        """Replace state.json (tmp + rename; the sender thread is its only writer)."""
        self._saved_progress = progress
        with self._cond:
            data = {"last_error": self._last_error, "progress": progress, "updated_at": time.time()}
        tmp = self.directory / (STATE_FILE + ".tmp")
        try:
            tmp.write_text(json.dumps(data))
            os.replace(tmp, self.directory / STATE_FILE)
        except OSError as exc:
            log.warning("report spool %s: cannot write %s: %s", self.directory, STATE_FILE, exc)
