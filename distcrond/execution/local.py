"""Run a command as a subprocess of the daemon, on this host.

Every run gets its own session (and so its own process group), which the run
owns: a timeout, a cancel or :meth:`LocalRunner.close` signals the whole group,
grandchildren included, and when :meth:`LocalRunner.run` returns nothing of the
group is left running — background processes a job leaves behind are killed
once its main process has exited (a job that means to start a daemon must put
it in a session of its own, e.g. with ``setsid``).

One thread per run: the calling thread spawns the process, then reads stdout,
stderr and the process's exit (a pidfd) through one selector, waking at least
every 50 ms to notice a cancel.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, replace
from datetime import datetime

from distcrond.clock import Clock
from distcrond.config.durations import format_duration
from distcrond.execution.base import Runner, RunOutcome, RunRequest
from distcrond.execution.capture import BoundedBuffer

# How often the read loop wakes, at most, to look at the cancel event and the clock.
_POLL_INTERVAL = 0.05
# Bytes asked for per read: a Linux pipe holds 64 KiB by default.
_READ_SIZE = 65536
# After the leftovers of a group were SIGKILLed, how long to wait for the pipes to
# reach end-of-file before giving up on them (a holder that left the group survives).
_DRAIN_AFTER_KILL = 0.5

_STDOUT = "stdout"
_STDERR = "stderr"
_EXIT = "exit"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _killpg(pgid: int, sig: int) -> None:
    """Signal a process group; a group that is already gone is not an error."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _spawn_error_reason(exc: OSError, request: RunRequest) -> str:
    """Why a spawn failed, naming the path: "no such file or directory: /no/such/bin"."""
    what = (exc.strerror or str(exc)).lower()
    if exc.filename is None:
        return f"cannot start {request.argv[0]}: {what}"
    path = os.fsdecode(exc.filename)
    # subprocess reports a failed chdir with the working directory as the filename.
    if path == request.working_dir and path != request.argv[0]:
        return f"working directory: {what}: {path}"
    return f"{what}: {path}"


@dataclass
class _Live:
    """A running process group, as the registry knows it."""

    process: subprocess.Popen[bytes]
    pgid: int


class LocalRunner(Runner):
    """Runs a :class:`RunRequest` as a local subprocess; never raises for the command's failure.

    - ``argv`` is executed directly (no shell), with the daemon's environment
      plus ``request.env``, in ``request.working_dir``, stdin from /dev/null.
    - stdout and stderr are captured separately, each bounded to
      ``request.max_output_bytes`` (head and tail kept, see
      :class:`~distcrond.execution.capture.BoundedBuffer`); the pipes are always
      read, so any amount of output passes without blocking the command.
    - At ``request.timeout`` (measured on ``clock.monotonic()``) or when
      ``request.cancel`` is set, the process group gets SIGTERM, then SIGKILL
      ``kill_grace`` seconds later: ``timed_out``/``cancelled`` is set and
      ``reason`` is ``"timed out after 30s"`` / ``"cancelled"``.
    - When the main process has exited, the pipes get ``output_grace`` seconds
      to reach end-of-file (a background grandchild may hold them open); then
      the rest of the group is SIGKILLed and the run ends with what was read.
    - ``exit_code`` is the main process's exit status; when it was killed by a
      signal, ``exit_code`` is None and ``reason`` names the signal
      (``"killed by signal SIGKILL"``), rather than the shell's 128+n.
      ``ok`` means exit status 0, neither timed out nor cancelled.
    - A command that cannot be started (not found, not executable, bad working
      directory) gives ``not_started=True``, ``exit_code=None`` and a reason
      naming the path and the error: ``"no such file or directory: /no/such/bin"``.
    - Thread-safe: any number of runs may proceed at once, one per thread.
    """

    connection_type = "local"

    def __init__(
        self,
        clock: Clock | None = None,
        kill_grace: float = 5.0,
        output_grace: float = 1.0,
    ) -> None:
        self._clock = clock if clock is not None else Clock()
        self._kill_grace = kill_grace
        self._output_grace = output_grace
        self._lock = threading.Condition()
        self._live: dict[int, _Live] = {}
        self._active = 0  # runs inside run(), spawned or about to be
        self._closing = threading.Event()

    # -- public ---------------------------------------------------------------

    def run(self, request: RunRequest) -> RunOutcome:
        """Run ``request`` to its end (blocking) and return what happened."""
        started_at = self._clock.now()
        if not request.argv:
            return self._not_started(started_at, "empty command")
        with self._lock:
            # Counted before spawning, so that close() waits for a run being spawned.
            if self._closing.is_set():
                return self._not_started(started_at, "runner is closed")
            self._active += 1
        try:
            return self._run(request, started_at)
        finally:
            with self._lock:
                self._active -= 1
                self._lock.notify_all()

    def _run(self, request: RunRequest, started_at: datetime) -> RunOutcome:
        if request.cancel.is_set():
            # Nothing ran: it may be placed again, but it is also a cancel.
            outcome = self._not_started(started_at, "cancelled before start")
            return replace(outcome, cancelled=True)
        try:
            process = subprocess.Popen(
                request.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=request.working_dir,
                env={**os.environ, **request.env} if request.env else None,
                close_fds=True,
                start_new_session=True,
                bufsize=0,
            )
        except OSError as exc:
            return self._not_started(started_at, _spawn_error_reason(exc, request))
        except ValueError as exc:  # e.g. an embedded NUL byte in argv or env
            return self._not_started(started_at, f"cannot start {request.argv[0]!r}: {exc}")

        live = _Live(process=process, pgid=process.pid)  # setsid: the pid is the pgid
        with self._lock:
            self._live[process.pid] = live
        try:
            return self._supervise(request, live, started_at)
        finally:
            with self._lock:
                del self._live[process.pid]

    def close(self) -> None:
        """Stop every run still going and wait until their process groups are gone.

        Runs in progress are cancelled (SIGTERM, SIGKILL after ``kill_grace``)
        and return ``cancelled=True``; later calls to :meth:`run` start nothing.
        Returns when every run has ended or, at the latest, after ``kill_grace``
        plus ``output_grace`` plus about a second, having SIGKILLed whatever
        groups remained.
        """
        # Time for a run to notice, and for its pipes after the kill (see _read_until_done).
        margin = _POLL_INTERVAL + self._output_grace + _DRAIN_AFTER_KILL + 0.5
        with self._lock:
            self._closing.set()
            # The runs see the flag within a poll interval and terminate their groups.
            self._lock.wait_for(lambda: self._active == 0, timeout=self._kill_grace + margin)
            for live in self._live.values():
                _killpg(live.pgid, signal.SIGKILL)
            self._lock.wait_for(lambda: self._active == 0, timeout=margin)

    def live_process_groups(self) -> list[int]:
        """The process group ids of the runs in progress (for diagnostics and tests)."""
        with self._lock:
            return [live.pgid for live in self._live.values()]

    # -- internals ------------------------------------------------------------

    def _not_started(self, started_at: datetime, reason: str) -> RunOutcome:
        return RunOutcome(
            ok=False,
            exit_code=None,
            started_at=started_at,
            ended_at=self._clock.now(),
            reason=reason,
            not_started=True,
        )

    def _supervise(self, request: RunRequest, live: _Live, started_at: datetime) -> RunOutcome:
        process = live.process
        assert process.stdout is not None and process.stderr is not None
        buffers = {
            _STDOUT: BoundedBuffer(request.max_output_bytes),
            _STDERR: BoundedBuffer(request.max_output_bytes),
        }
        selector = selectors.PollSelector()
        pidfd = _open_pidfd(process.pid)
        try:
            selector.register(process.stdout.fileno(), selectors.EVENT_READ, _STDOUT)
            selector.register(process.stderr.fileno(), selectors.EVENT_READ, _STDERR)
            if pidfd is not None:
                selector.register(pidfd, selectors.EVENT_READ, _EXIT)
            stop = self._read_until_done(request, live, selector, buffers, pidfd is not None)
        finally:
            selector.close()
            if pidfd is not None:
                os.close(pidfd)
            # The main process has exited but is not reaped yet, so the pgid cannot
            # have been reused: whatever is left of the group is ours to kill.
            _killpg(live.pgid, signal.SIGKILL)
            process.stdout.close()
            process.stderr.close()
            returncode = process.wait()

        ended_at = self._clock.now()
        stdout, out_truncated = buffers[_STDOUT].result()
        stderr, err_truncated = buffers[_STDERR].result()
        exit_code: int | None = returncode if returncode >= 0 else None
        timed_out = stop == "timeout"
        cancelled = stop == "cancel"
        if timed_out:
            assert request.timeout is not None
            reason = f"timed out after {format_duration(request.timeout)}"
        elif cancelled:
            reason = "cancelled: runner closed" if self._closing.is_set() else "cancelled"
        elif returncode < 0:
            reason = f"killed by signal {_signal_name(-returncode)}"
        elif returncode != 0:
            reason = f"exited with code {returncode}"
        else:
            reason = ""
        return RunOutcome(
            ok=returncode == 0 and not timed_out and not cancelled,
            exit_code=exit_code,
            started_at=started_at,
            ended_at=ended_at,
            stdout=stdout,
            stderr=stderr,
            output_truncated=out_truncated or err_truncated,
            reason=reason,
            timed_out=timed_out,
            cancelled=cancelled,
        )

    def _read_until_done(
        self,
        request: RunRequest,
        live: _Live,
        selector: selectors.BaseSelector,
        buffers: dict[str, BoundedBuffer],
        have_pidfd: bool,
    ) -> str | None:
        """Read the pipes until the main process has exited and they are closed (or given up).

        Returns why the run was stopped ("timeout", "cancel") or None. Leaves
        the main process exited but unreaped.
        """
        deadline = (
            self._clock.monotonic() + request.timeout.total_seconds()
            if request.timeout is not None
            else None
        )
        stop: str | None = None
        term_sent_at: float | None = None  # time.monotonic() of the SIGTERM
        kill_sent = False
        exited_at: float | None = None  # time.monotonic() when the main process exit was seen
        give_up_at: float | None = None  # stop waiting for EOF after the final SIGKILL
        open_pipes = 2

        while True:
            now = time.monotonic()
            if stop is None:
                if request.cancel.is_set() or self._closing.is_set():
                    stop = "cancel"
                elif deadline is not None and self._clock.monotonic() >= deadline:
                    stop = "timeout"
                if stop is not None:
                    _killpg(live.pgid, signal.SIGTERM)
                    term_sent_at = now
            if exited_at is None and not have_pidfd and _has_exited(live.process.pid):
                exited_at = now
            if exited_at is not None and open_pipes == 0:
                return stop
            if (
                term_sent_at is not None
                and not kill_sent
                and now >= term_sent_at + self._kill_grace
            ):
                _killpg(live.pgid, signal.SIGKILL)
                kill_sent = True
            if (
                exited_at is not None
                and give_up_at is None
                and now >= exited_at + self._output_grace
            ):
                # The main process is gone but something still holds a pipe open.
                _killpg(live.pgid, signal.SIGKILL)
                give_up_at = now + _DRAIN_AFTER_KILL
            if give_up_at is not None and now >= give_up_at:
                return stop  # a pipe holder escaped the group: leave it what it wrote

            # Sleep until the next thing to look at, but no longer than the poll interval.
            wake = now + _POLL_INTERVAL
            if stop is None and deadline is not None:
                wake = min(wake, now + max(0.0, deadline - self._clock.monotonic()))
            for at in (
                term_sent_at + self._kill_grace if term_sent_at is not None else None,
                exited_at + self._output_grace if exited_at is not None else None,
                give_up_at,
            ):
                if at is not None:
                    wake = min(wake, at)
            for key, _ in selector.select(max(0.0, wake - now)):
                if key.data == _EXIT:
                    selector.unregister(key.fd)
                    exited_at = time.monotonic()
                    continue
                fd = key.fd
                chunk = os.read(fd, _READ_SIZE)
                if chunk:
                    buffers[key.data].feed(chunk)
                else:
                    selector.unregister(fd)
                    open_pipes -= 1


def _open_pidfd(pid: int) -> int | None:
    """A pidfd for ``pid`` (readable once it exits), or None where unsupported."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _has_exited(pid: int) -> bool:
    """Whether the child has exited, without reaping it (so its pid stays reserved)."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None
