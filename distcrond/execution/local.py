"""Run a command as a subprocess of the daemon, on this host.

Every run gets its own session (and so its own process group), which the run
owns: a timeout, a cancel or :meth:`LocalRunner.close` signals the whole group,
grandchildren included, and when a run ends nothing of the group is left
running — background processes a job leaves behind are killed once its main
process has exited (a job that means to start a daemon must put it in a session
of its own, e.g. with ``setsid``).

:meth:`LocalRunner.start` spawns the process in the calling thread and returns at
once; one supervisor thread ("local-runs") then watches every run's stdout, stderr
and exit (a pidfd) through one epoll selector, waking at least every 50 ms while
runs are live to notice cancels and timeouts. Many runs thus cost no thread each,
and a burst of starts does not compete with a thread per run for the interpreter.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime

from distcrond.clock import Clock
from distcrond.config.durations import format_duration
from distcrond.execution.base import Attempt, Runner, RunOutcome, RunRequest
from distcrond.execution.capture import BoundedBuffer
from distcrond.execution.environment import RunEnvironment

# How often the read loop wakes, at most, to look at the cancel event and the clock.
_POLL_INTERVAL = 0.05
# Bytes asked for per read: a Linux pipe holds 64 KiB by default.
_READ_SIZE = 65536
# How long, at most, the supervisor puts its work off while runs are being started.
_MAX_HOLD = 1.0
# After the leftovers of a group were SIGKILLed, how long to wait for the pipes to
# reach end-of-file before giving up on them (a holder that left the group survives).
_DRAIN_AFTER_KILL = 0.5

log = logging.getLogger("distcrond.local")

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


@dataclass(eq=False)
class _Watch:
    """A live run, as the supervisor thread sees it."""

    request: RunRequest
    process: subprocess.Popen[bytes]
    started_at: datetime
    deadline: float | None  # on the runner clock's monotonic()
    pidfd: int | None  # readable once the main process has exited; None where unsupported
    attempt: Attempt = field(default_factory=Attempt)
    buffers: dict[str, BoundedBuffer] = field(default_factory=dict)
    open_pipes: int = 2
    stop: str | None = None  # "timeout" or "cancel", once the group was told to stop
    term_sent_at: float | None = None  # time.monotonic() of the SIGTERM
    kill_sent: bool = False
    exited_at: float | None = None  # time.monotonic() when the main process's exit was seen
    give_up_at: float | None = None  # stop waiting for end-of-file after the final SIGKILL
    broken: bool = False  # watching it failed: it is ended at once

    @property
    def pgid(self) -> int:
        return self.process.pid  # setsid: the pid is the process group id


class LocalRunner(Runner):
    """Runs a :class:`RunRequest` as a local subprocess; never raises for the command's failure.

    - ``argv`` is executed directly (no shell), in ``request.working_dir``, stdin from
      /dev/null, with the environment ``environment`` builds: the daemon's (as it was
      when that was made) without the daemon's secrets, then ``request.env`` over it,
      which may set a scrubbed name (see :mod:`distcrond.execution.environment`). The
      default scrubs :data:`~distcrond.settings.SECRET_ENV_NAMES` of ``os.environ``.
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
    - Thread-safe: any number of runs may be started and waited for at once.
    """

    connection_type = "local"
    starts_without_blocking = True

    def __init__(
        self,
        clock: Clock | None = None,
        kill_grace: float = 5.0,
        output_grace: float = 1.0,
        environment: RunEnvironment | None = None,
    ) -> None:
        self._clock = clock if clock is not None else Clock()
        self._environment = environment if environment is not None else RunEnvironment()
        self._kill_grace = kill_grace
        self._output_grace = output_grace
        self._lock = threading.Condition()
        self._live: dict[int, _Watch] = {}  # pgid -> run, from its spawn until its end
        self._incoming: list[_Watch] = []  # spawned, not yet watched by the supervisor
        self._active = 0  # runs started and not ended, spawned or about to be
        self._closing = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._starting = 0  # callers inside starting()
        self._wake_r = self._wake_w = -1

    # -- public ---------------------------------------------------------------

    def run(self, request: RunRequest) -> RunOutcome:
        """Run ``request`` to its end (blocking) and return what happened."""
        return self.start(request).wait()

    def start(self, request: RunRequest) -> Attempt:
        """Spawn ``request``'s command and return at once; the attempt ends when the run
        does (its callbacks are called on the supervisor thread)."""
        started_at = self._clock.now()
        if not request.argv:
            return Attempt.ended(self._not_started(started_at, "empty command"))
        with self._lock:
            # Counted before spawning, so that close() waits for a run being spawned.
            if self._closing.is_set():
                return Attempt.ended(self._not_started(started_at, "runner is closed"))
            self._active += 1
            self._ensure_supervisor()
        try:
            spawned = self._spawn(request, started_at)
        except BaseException:
            self._release()
            raise
        if isinstance(spawned, RunOutcome):
            self._release()
            return Attempt.ended(spawned)
        with self._lock:
            self._live[spawned.pgid] = spawned
            self._incoming.append(spawned)
        self._wake()
        return spawned.attempt

    @contextlib.contextmanager
    def starting(self) -> Iterator[None]:
        """While the caller starts runs, the supervisor waits (at most _MAX_HOLD seconds)
        before it reads output and ends runs: two hundred runs due at once are spawned
        without the supervisor competing for the interpreter and the CPUs. The pipes
        hold what the runs write meanwhile (64 KiB each; a run that writes more waits)."""
        with self._lock:
            self._starting += 1
        try:
            yield
        finally:
            with self._lock:
                self._starting -= 1
                self._lock.notify_all()
            self._wake()

    def close(self) -> None:
        """Stop every run still going and wait until their process groups are gone.

        Runs in progress are cancelled (SIGTERM, SIGKILL after ``kill_grace``)
        and end with ``cancelled=True``; later calls to :meth:`start` start nothing.
        Returns when every run has ended or, at the latest, after ``kill_grace``
        plus ``output_grace`` plus about a second, having SIGKILLed whatever
        groups remained.
        """
        # Time for the supervisor to notice, and for the pipes after the kill.
        margin = _POLL_INTERVAL + self._output_grace + _DRAIN_AFTER_KILL + 0.5
        with self._lock:
            self._closing.set()
        self._wake()
        with self._lock:
            # The supervisor sees the flag at once and terminates the groups.
            self._lock.wait_for(lambda: self._active == 0, timeout=self._kill_grace + margin)
            for watch in self._live.values():
                _killpg(watch.pgid, signal.SIGKILL)
            self._lock.wait_for(lambda: self._active == 0, timeout=margin)

    def live_process_groups(self) -> list[int]:
        """The process group ids of the runs in progress (for diagnostics and tests)."""
        with self._lock:
            return list(self._live)

    # -- starting -------------------------------------------------------------

    def _not_started(self, started_at: datetime, reason: str) -> RunOutcome:
        return RunOutcome(
            ok=False,
            exit_code=None,
            started_at=started_at,
            ended_at=self._clock.now(),
            reason=reason,
            not_started=True,
        )

    def _spawn(self, request: RunRequest, started_at: datetime) -> _Watch | RunOutcome:
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
                # Always explicit: inheriting (env=None) would hand the run the secrets.
                env=self._environment.for_run(request.env),
                close_fds=True,
                start_new_session=True,
                bufsize=0,
            )
        except OSError as exc:
            return self._not_started(started_at, _spawn_error_reason(exc, request))
        except ValueError as exc:  # e.g. an embedded NUL byte in argv or env
            return self._not_started(started_at, f"cannot start {request.argv[0]!r}: {exc}")
        deadline = (
            self._clock.monotonic() + request.timeout.total_seconds()
            if request.timeout is not None
            else None
        )
        return _Watch(
            request=request,
            process=process,
            started_at=started_at,
            deadline=deadline,
            pidfd=_open_pidfd(process.pid),
            buffers={
                _STDOUT: BoundedBuffer(request.max_output_bytes),
                _STDERR: BoundedBuffer(request.max_output_bytes),
            },
        )

    def _release(self) -> None:
        with self._lock:
            self._active -= 1
            self._lock.notify_all()

    # -- the supervisor thread -------------------------------------------------

    def _ensure_supervisor(self) -> None:
        """Start the supervisor thread if it is not running (called with the lock held)."""
        if self._supervisor is not None:
            return
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._supervisor = threading.Thread(target=self._supervise, name="local-runs", daemon=True)
        self._supervisor.start()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            if self._wake_w >= 0:
                os.write(self._wake_w, b"\0")

    def _supervise(self) -> None:
        """Read every run's pipes and exit, signal the groups that must stop, end the runs.
        The thread never dies of an error: every run depends on it to end."""
        selector = selectors.DefaultSelector()
        selector.register(self._wake_r, selectors.EVENT_READ, None)
        watched: set[_Watch] = set()
        next_scan = 0.0  # time.monotonic() of the next look at every run
        try:
            while True:
                try:
                    following = self._supervise_once(selector, watched, next_scan)
                except Exception:
                    log.exception("the local runs' supervisor failed; it goes on")
                    time.sleep(_POLL_INTERVAL)  # a back-off, should the error repeat
                    continue
                if following is None:
                    return
                next_scan = following
        finally:
            selector.close()
            os.close(self._wake_r)
            with self._lock:
                os.close(self._wake_w)
                self._wake_w = -1

    def _supervise_once(
        self, selector: selectors.BaseSelector, watched: set[_Watch], next_scan: float
    ) -> float | None:
        """One turn of the loop: the time of the next full scan, or None to stop."""
        touched = self._take_incoming(selector, watched)
        if not watched and self._closing.is_set():
            with self._lock:
                if self._active == 0 and not self._incoming:
                    return None
        if self._starting:
            with self._lock:
                self._lock.wait_for(
                    lambda: not self._starting or self._closing.is_set(), timeout=_MAX_HOLD
                )
        timeout = max(0.0, next_scan - time.monotonic()) if watched else None
        for key, _ in selector.select(timeout):
            if key.data is None:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._wake_r, 4096):
                        pass
                continue
            watch, what = key.data
            touched.add(watch)
            try:
                self._on_ready(selector, watch, what, key.fd)
            except Exception:
                log.exception("run %s: reading it failed", watch.request.run_id)
                watch.broken = True
        now = time.monotonic()
        if now >= next_scan:  # a cancel or a timer of any run may be due
            touched, next_scan = set(watched), now + _POLL_INTERVAL
        for watch in touched:
            try:
                done, timer = (True, now) if watch.broken else self._check(watch, now)
            except Exception:
                log.exception("run %s: supervising it failed", watch.request.run_id)
                done, timer = True, now
            if done:
                watched.discard(watch)
                self._end(selector, watch)
            else:
                next_scan = min(next_scan, timer)
        return next_scan

    def _take_incoming(self, selector: selectors.BaseSelector, watched: set[_Watch]) -> set[_Watch]:
        with self._lock:
            incoming, self._incoming = self._incoming, []
        for watch in incoming:
            process = watch.process
            assert process.stdout is not None and process.stderr is not None
            watched.add(watch)
            try:
                selector.register(process.stdout.fileno(), selectors.EVENT_READ, (watch, _STDOUT))
                selector.register(process.stderr.fileno(), selectors.EVENT_READ, (watch, _STDERR))
                if watch.pidfd is not None:
                    selector.register(watch.pidfd, selectors.EVENT_READ, (watch, _EXIT))
            except Exception:
                log.exception("run %s: watching it failed", watch.request.run_id)
                watch.broken = True  # ended (its group killed) in this turn
        return set(incoming)

    @staticmethod
    def _on_ready(selector: selectors.BaseSelector, watch: _Watch, what: str, fd: int) -> None:
        if what == _EXIT:
            selector.unregister(fd)
            watch.exited_at = time.monotonic()
            return
        try:
            chunk = os.read(fd, _READ_SIZE)
        except OSError:
            chunk = b""
        if chunk:
            watch.buffers[what].feed(chunk)
        else:
            selector.unregister(fd)
            watch.open_pipes -= 1

    def _check(self, w: _Watch, now: float) -> tuple[bool, float]:
        """Act on what is due for one run: (whether it has ended, when to look again)."""
        if w.stop is None:
            if w.request.cancel.is_set() or self._closing.is_set():
                w.stop = "cancel"
            elif w.deadline is not None and self._clock.monotonic() >= w.deadline:
                w.stop = "timeout"
            if w.stop is not None:
                _killpg(w.pgid, signal.SIGTERM)
                w.term_sent_at = now
        if w.exited_at is None and w.pidfd is None and _has_exited(w.process.pid):
            w.exited_at = now
        if w.exited_at is not None and w.open_pipes == 0:
            return True, now
        if (
            w.term_sent_at is not None
            and not w.kill_sent
            and now >= w.term_sent_at + self._kill_grace
        ):
            _killpg(w.pgid, signal.SIGKILL)
            w.kill_sent = True
        if (
            w.exited_at is not None
            and w.give_up_at is None
            and now >= w.exited_at + self._output_grace
        ):
            # The main process is gone but something still holds a pipe open.
            _killpg(w.pgid, signal.SIGKILL)
            w.give_up_at = now + _DRAIN_AFTER_KILL
        if w.give_up_at is not None and now >= w.give_up_at:
            return True, now  # a pipe holder escaped the group: leave it what it wrote
        timer = now + _POLL_INTERVAL
        if w.stop is None and w.deadline is not None:
            timer = min(timer, now + max(0.0, w.deadline - self._clock.monotonic()))
        for at in (
            w.term_sent_at + self._kill_grace
            if w.term_sent_at is not None and not w.kill_sent
            else None,
            w.exited_at + self._output_grace if w.exited_at is not None else None,
            w.give_up_at,
        ):
            if at is not None:
                timer = min(timer, at)
        return False, timer

    def _end(self, selector: selectors.BaseSelector, watch: _Watch) -> None:
        """Reap the run, kill what is left of its group, and end its attempt."""
        process = watch.process
        assert process.stdout is not None and process.stderr is not None
        try:
            for fd in (process.stdout.fileno(), process.stderr.fileno(), watch.pidfd):
                if fd is not None and fd in selector.get_map():
                    selector.unregister(fd)
            if watch.pidfd is not None:
                os.close(watch.pidfd)
            # The main process has exited but is not reaped yet, so the pgid cannot
            # have been reused: whatever is left of the group is ours to kill.
            _killpg(watch.pgid, signal.SIGKILL)
            process.stdout.close()
            process.stderr.close()
            returncode = process.wait()
            outcome = self._outcome(watch, returncode)
            if watch.broken:
                outcome = replace(
                    outcome, ok=False, reason="watching the process failed: it was killed"
                )
        except Exception as exc:  # never leave an attempt without an end
            log.exception("run %s: ending it failed", watch.request.run_id)
            outcome = RunOutcome(
                ok=False,
                exit_code=None,
                started_at=watch.started_at,
                ended_at=self._clock.now(),
                reason=f"supervising the process failed: {exc}",
            )
        with self._lock:
            self._live.pop(watch.pgid, None)
        try:
            watch.attempt.end(outcome)
        finally:
            self._release()

    def _outcome(self, watch: _Watch, returncode: int) -> RunOutcome:
        request = watch.request
        stdout, out_truncated = watch.buffers[_STDOUT].result()
        stderr, err_truncated = watch.buffers[_STDERR].result()
        exit_code: int | None = returncode if returncode >= 0 else None
        timed_out = watch.stop == "timeout"
        cancelled = watch.stop == "cancel"
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
            started_at=watch.started_at,
            ended_at=self._clock.now(),
            stdout=stdout,
            stderr=stderr,
            output_truncated=out_truncated or err_truncated,
            reason=reason,
            timed_out=timed_out,
            cancelled=cancelled,
        )


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
