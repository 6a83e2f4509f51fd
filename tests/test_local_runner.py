"""LocalRunner against real processes: exit codes, environment, timeouts, process groups, output."""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from distcrond.clock import FakeClock
from distcrond.execution.base import RunOutcome, RunRequest
from distcrond.execution.capture import omission_marker
from distcrond.execution.local import LocalRunner

SH = "/bin/sh"


def request(*argv: str, **kwargs: object) -> RunRequest:
    return RunRequest(
        run_id="run-1",
        job_id="job-1",
        node_id="node-1",
        peer_id="peer-1",
        slot=datetime(2024, 1, 1, tzinfo=UTC),
        argv=tuple(argv),
        **kwargs,  # type: ignore[arg-type]
    )


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.01)


def process_gone(pid: int) -> bool:
    """No such process, or only a zombie (a container's init may be slow to reap)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def read_pid(path: Path) -> int:
    wait_until(lambda: path.exists() and path.read_text().strip() != "")
    return int(path.read_text())


class Background:
    """Runs ``runner.run(req)`` on a thread; ``result()`` joins it."""

    def __init__(self, runner: LocalRunner, req: RunRequest) -> None:
        self._outcome: RunOutcome | None = None
        self._thread = threading.Thread(target=self._go, args=(runner, req), daemon=True)
        self._thread.start()

    def _go(self, runner: LocalRunner, req: RunRequest) -> None:
        self._outcome = runner.run(req)

    def result(self, timeout: float = 20.0) -> RunOutcome:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "run() did not return"
        assert self._outcome is not None
        return self._outcome


@pytest.fixture
def runner() -> Iterator[LocalRunner]:
    r = LocalRunner(kill_grace=0.5, output_grace=0.3)
    yield r
    r.close()


# -- exit codes and arguments ---------------------------------------------------


def test_exit_code_zero_is_ok(runner: LocalRunner) -> None:
    outcome = runner.run(request("/bin/true"))
    assert outcome.ok
    assert outcome.exit_code == 0
    assert outcome.reason == ""
    assert not (outcome.timed_out or outcome.cancelled or outcome.not_started)


def test_nonzero_exit_code_fails_with_the_code(runner: LocalRunner) -> None:
    outcome = runner.run(request(SH, "-c", "exit 3"))
    assert not outcome.ok
    assert outcome.exit_code == 3
    assert outcome.reason == "exited with code 3"
    assert not outcome.not_started


def test_death_by_signal_gives_no_exit_code_and_names_the_signal(runner: LocalRunner) -> None:
    outcome = runner.run(request(SH, "-c", "kill -KILL $$"))
    assert not outcome.ok
    assert outcome.exit_code is None
    assert outcome.reason == "killed by signal SIGKILL"


def test_argv_reaches_the_program_unchanged_without_a_shell(runner: LocalRunner) -> None:
    args = ["a b", "'single'", '"double"', "x; echo pwned", "$(echo hi)", "`id`", "*", "", "é"]
    script = "import json, sys; print(json.dumps(sys.argv[1:]))"
    outcome = runner.run(request(sys.executable, "-c", script, *args))
    assert outcome.ok, outcome
    assert json.loads(outcome.stdout) == args


def test_environment_is_the_daemons_plus_the_requests(runner: LocalRunner) -> None:
    env = {"DISTCRON_RUN_ID": "run-1", "DISTCRON_JOB_ID": "job-1", "JOB_SETTING": "v a l"}
    script = "import json, os; print(json.dumps(dict(os.environ)))"
    outcome = runner.run(request(sys.executable, "-c", script, env=env))
    seen = json.loads(outcome.stdout)
    for key, value in env.items():
        assert seen[key] == value
    assert seen["PATH"] == os.environ["PATH"]


def test_request_env_overrides_the_daemons(runner: LocalRunner) -> None:
    outcome = runner.run(request(SH, "-c", 'printf %s "$HOME"', env={"HOME": "/job/home"}))
    assert outcome.stdout == "/job/home"


def test_runs_in_the_working_dir(runner: LocalRunner, tmp_path: Path) -> None:
    outcome = runner.run(request(sys.executable, "-c", "import os; print(os.getcwd())",
                                 working_dir=str(tmp_path)))  # fmt: skip
    assert outcome.stdout.strip() == str(tmp_path.resolve())


def test_stdout_and_stderr_are_captured_separately(runner: LocalRunner) -> None:
    outcome = runner.run(request(SH, "-c", "echo out1; echo err1 >&2; echo out2; echo err2 >&2"))
    assert outcome.stdout == "out1\nout2\n"
    assert outcome.stderr == "err1\nerr2\n"
    assert not outcome.output_truncated


def test_stdin_is_empty(runner: LocalRunner) -> None:
    outcome = runner.run(request(SH, "-c", "cat; echo end"))
    assert outcome.ok
    assert outcome.stdout == "end\n"


def test_times_come_from_the_clock_in_utc() -> None:
    start = datetime(2030, 5, 6, 7, 8, 9, tzinfo=UTC)
    runner = LocalRunner(clock=FakeClock(start))
    outcome = runner.run(request("/bin/true"))
    assert outcome.started_at == start
    assert outcome.ended_at == start
    assert outcome.started_at.tzinfo is not None


def test_real_times_are_aware_utc_and_ordered(runner: LocalRunner) -> None:
    outcome = runner.run(request("/bin/true"))
    assert outcome.started_at.utcoffset() == timedelta(0)
    assert outcome.started_at <= outcome.ended_at


# -- commands that cannot start -------------------------------------------------


def test_missing_command_is_not_started_and_named(runner: LocalRunner) -> None:
    outcome = runner.run(request("/no/such/bin", "arg"))
    assert not outcome.ok
    assert outcome.not_started
    assert outcome.exit_code is None
    assert outcome.reason == "no such file or directory: /no/such/bin"


def test_command_not_on_path_is_not_started(runner: LocalRunner) -> None:
    outcome = runner.run(request("distcrond-no-such-command"))
    assert outcome.not_started
    assert outcome.reason == "no such file or directory: distcrond-no-such-command"


def test_non_executable_file_is_not_started(runner: LocalRunner, tmp_path: Path) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    outcome = runner.run(request(str(script)))
    assert outcome.not_started
    assert outcome.exit_code is None
    assert outcome.reason == f"permission denied: {script}"


def test_bad_working_dir_is_not_started_and_named(runner: LocalRunner, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    outcome = runner.run(request("/bin/true", working_dir=missing))
    assert outcome.not_started
    assert outcome.exit_code is None
    assert outcome.reason == f"working directory: no such file or directory: {missing}"


def test_empty_argv_is_not_started(runner: LocalRunner) -> None:
    outcome = runner.run(request())
    assert outcome.not_started
    assert not outcome.ok


# -- timeout, cancel, process groups ---------------------------------------------


def test_timeout_kills_the_whole_process_group(runner: LocalRunner, tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    started = time.monotonic()
    outcome = runner.run(
        request(
            SH, "-c", f"sleep 100 & echo $! > {pidfile}; sleep 100",
            timeout=timedelta(milliseconds=500),
        )
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert outcome.timed_out
    assert not outcome.ok
    assert not outcome.cancelled
    assert outcome.exit_code is None  # the shell died of SIGTERM
    assert outcome.reason == "timed out after 500ms"
    assert elapsed < 5
    grandchild = read_pid(pidfile)
    wait_until(lambda: process_gone(grandchild))


def test_term_ignoring_command_is_killed_after_the_grace(runner: LocalRunner) -> None:
    started = time.monotonic()
    outcome = runner.run(
        request(SH, "-c", "trap '' TERM; sleep 100", timeout=timedelta(milliseconds=300))
    )
    elapsed = time.monotonic() - started
    assert outcome.timed_out
    assert outcome.exit_code is None
    assert outcome.reason == "timed out after 300ms"
    assert elapsed >= 0.3 + 0.5  # the timeout, then the whole kill grace
    assert elapsed < 5


def test_timeout_reported_even_if_the_command_exits_cleanly_on_term(runner: LocalRunner) -> None:
    outcome = runner.run(
        request(SH, "-c", "trap 'exit 0' TERM; sleep 100 & wait", timeout=timedelta(seconds=0.3))
    )
    assert outcome.timed_out
    assert not outcome.ok


def test_cancel_stops_the_run(runner: LocalRunner, tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    req = request(SH, "-c", f"sleep 100 & echo $! > {pidfile}; sleep 100")
    run = Background(runner, req)
    grandchild = read_pid(pidfile)
    req.cancel.set()
    outcome = run.result()
    assert outcome.cancelled
    assert not outcome.timed_out
    assert not outcome.ok
    assert outcome.reason == "cancelled"
    wait_until(lambda: process_gone(grandchild))


def test_cancel_before_start_runs_nothing(runner: LocalRunner, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    req = request("/usr/bin/touch", str(marker))
    req.cancel.set()
    outcome = runner.run(req)
    assert outcome.cancelled
    assert outcome.not_started
    assert not marker.exists()


def test_background_grandchild_holding_stdout_does_not_hang(
    runner: LocalRunner, tmp_path: Path
) -> None:
    pidfile = tmp_path / "grandchild.pid"
    started = time.monotonic()
    outcome = runner.run(request(SH, "-c", f"sleep 100 & echo $! > {pidfile}; echo done"))
    assert time.monotonic() - started < 5
    assert outcome.ok
    assert outcome.stdout == "done\n"
    grandchild = read_pid(pidfile)
    wait_until(lambda: process_gone(grandchild))


def test_leftover_background_process_is_killed_when_the_run_ends(
    runner: LocalRunner, tmp_path: Path
) -> None:
    pidfile = tmp_path / "grandchild.pid"
    outcome = runner.run(request(SH, "-c", f"sleep 100 >/dev/null 2>&1 & echo $! > {pidfile}"))
    assert outcome.ok
    grandchild = read_pid(pidfile)
    wait_until(lambda: process_gone(grandchild))


def test_output_written_by_a_grandchild_before_the_end_is_kept(runner: LocalRunner) -> None:
    outcome = runner.run(request(SH, "-c", "(echo from-grandchild) & wait; echo main"))
    assert outcome.stdout == "from-grandchild\nmain\n"


def test_close_kills_running_groups_and_refuses_new_runs(tmp_path: Path) -> None:
    runner = LocalRunner(kill_grace=0.5, output_grace=0.3)
    pidfiles = [tmp_path / f"g{i}.pid" for i in range(3)]
    runs = [
        Background(runner, request(SH, "-c", f"sleep 100 & echo $! > {p}; sleep 100"))
        for p in pidfiles
    ]
    grandchildren = [read_pid(p) for p in pidfiles]
    wait_until(lambda: len(runner.live_process_groups()) == 3)
    groups = runner.live_process_groups()

    runner.close()

    assert runner.live_process_groups() == []
    for run in runs:
        outcome = run.result(timeout=1)
        assert outcome.cancelled
        assert outcome.reason == "cancelled: runner closed"
    for pid in [*groups, *grandchildren]:
        wait_until(lambda pid=pid: process_gone(pid))  # type: ignore[misc]
    later = runner.run(request("/bin/true"))
    assert later.not_started
    assert later.reason == "runner is closed"


def test_close_kills_term_ignoring_groups_after_the_grace(tmp_path: Path) -> None:
    runner = LocalRunner(kill_grace=0.3, output_grace=0.3)
    pidfile = tmp_path / "main.pid"
    run = Background(runner, request(SH, "-c", f"trap '' TERM; echo $$ > {pidfile}; sleep 100"))
    main = read_pid(pidfile)
    runner.close()
    assert run.result(timeout=1).cancelled
    wait_until(lambda: process_gone(main))


# -- output ------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_a_gigabyte_of_output_passes_in_bounded_memory(runner: LocalRunner) -> None:
    limit = 64 * 1024
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    outcome = runner.run(
        request(
            SH, "-c", "head -c 1000000000 /dev/zero; head -c 1000 /dev/zero >&2",
            max_output_bytes=limit, timeout=timedelta(seconds=25),
        )
    )  # fmt: skip
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert outcome.ok, outcome.reason
    assert outcome.output_truncated
    omitted = 1_000_000_000 - limit
    assert outcome.stdout == "\0" * (limit // 2) + "\n" + omission_marker(omitted) + "\0" * (
        limit // 2
    )
    assert outcome.stderr == "\0" * 1000
    assert rss_growth < 100 * 1024  # far less than the gigabyte that went through


def test_truncated_output_shows_head_marker_and_tail(runner: LocalRunner) -> None:
    script = "import sys; sys.stdout.write('FIRST' + 'x' * 100000 + 'LAST!')"
    outcome = runner.run(request(sys.executable, "-c", script, max_output_bytes=10))
    assert outcome.output_truncated
    assert outcome.stdout == "FIRST\n" + omission_marker(100000) + "LAST!"
    assert outcome.stderr == ""


def test_invalid_utf8_output_is_decoded_with_replacement(runner: LocalRunner) -> None:
    outcome = runner.run(request(SH, "-c", r"printf 'ok \377\376 end'"))
    assert outcome.stdout == "ok \ufffd\ufffd end"


def test_concurrent_runs_do_not_mix_output(runner: LocalRunner) -> None:
    runs = [Background(runner, request(SH, "-c", f"echo {i}; echo e{i} >&2")) for i in range(20)]
    for i, run in enumerate(runs):
        outcome = run.result()
        assert (outcome.stdout, outcome.stderr) == (f"{i}\n", f"e{i}\n")


def test_command_that_closes_its_pipes_still_times_out(runner: LocalRunner) -> None:
    outcome = runner.run(
        request(SH, "-c", "exec >&- 2>&-; sleep 100", timeout=timedelta(milliseconds=300))
    )
    assert outcome.timed_out
    assert outcome.exit_code is None


def test_pipe_held_by_a_process_outside_the_group_does_not_hang(
    runner: LocalRunner, tmp_path: Path
) -> None:
    pidfile = tmp_path / "escaped.pid"
    script = f"setsid sh -c 'echo $$ > {pidfile}; exec sleep 100' & echo done"
    started = time.monotonic()
    outcome = runner.run(request(SH, "-c", script))
    escaped = read_pid(pidfile)
    try:
        assert time.monotonic() - started < 5
        assert outcome.ok
        assert outcome.stdout == "done\n"
    finally:
        os.kill(escaped, 9)


def _runs_local_code(thread: threading.Thread) -> bool:
    target = getattr(thread, "_target", None)  # CPython keeps it while the thread runs
    return getattr(target, "__module__", "").startswith("distcrond.execution")


def test_start_returns_at_once_and_one_thread_supervises_every_run(tmp_path: Path) -> None:
    runner = LocalRunner()
    go = tmp_path / "go"
    threads_before = set(threading.enumerate())
    wait_for_go = f"while [ ! -e {go} ]; do sleep 0.05; done"
    try:
        attempts = [runner.start(request(SH, "-c", f"{wait_for_go}; echo {i}")) for i in range(20)]
        # Every command is spawned and still waiting: start() did not wait for any of them.
        assert len(runner.live_process_groups()) == 20
        assert not any(attempt.done() for attempt in attempts)
        # One supervisor thread for the twenty runs, not a thread each.
        # (Threads that other tests' leftovers start meanwhile are not the runner's: only those
        # running the runner's own code are counted.)
        new_threads = Counter(
            t.name for t in set(threading.enumerate()) - threads_before if _runs_local_code(t)
        )
        assert new_threads == Counter({"local-runs": 1})
        go.touch()
        outcomes = [attempt.wait() for attempt in attempts]
        assert [o.stdout for o in outcomes] == [f"{i}\n" for i in range(20)]
        assert all(o.ok for o in outcomes)
    finally:
        go.touch()
        runner.close()


def test_while_runs_are_being_started_the_supervisor_puts_off_its_work(tmp_path: Path) -> None:
    runner = LocalRunner()
    try:
        with runner.starting():
            attempt = runner.start(request(SH, "-c", "echo quick"))
            # The command ends at once, but its run is not ended while starts go on.
            assert not attempt.done(0.3)
        assert attempt.wait().stdout == "quick\n"
    finally:
        runner.close()


def test_an_error_watching_one_run_ends_that_run_and_the_supervisor_goes_on(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    runner = LocalRunner()
    real_on_ready = LocalRunner._on_ready
    failures = [1]

    def on_ready_failing_once(*args: object) -> None:
        if failures:
            failures.pop()
            raise OSError("injected: reading the pipe failed")
        real_on_ready(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(LocalRunner, "_on_ready", staticmethod(on_ready_failing_once))
    try:
        pid_file = tmp_path / "pid"
        broken = runner.run(request(SH, "-c", f"echo $$ > {pid_file}; echo out; sleep 30"))
        assert not broken.ok and broken.reason == "watching the process failed: it was killed"
        wait_until(lambda: process_gone(read_pid(pid_file)))
        after = runner.run(request(SH, "-c", "echo fine"))
        assert after.ok and after.stdout == "fine\n"
    finally:
        runner.close()
