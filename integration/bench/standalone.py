"""Standalone benchmark: how late distcrond starts 200 runs a second, against a minimal loop.

Run from the repository root: ``python -m integration.bench.standalone`` (``make bench``).
It prints figures and ratios; it is not a test. It exits non-zero only when the daemon
cannot start at all. See README.md beside this file for what each figure means.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from distcrond.config.models import JobSpec
from distcrond.runs import format_slot, run_id_for
from distcrond.scheduling.schedules import next_slot
from integration.bench.ledger import (
    Figures,
    due_slots,
    ledger_command,
    measure,
    percentile,
    read_ledger,
)

REPO = Path(__file__).resolve().parents[2]
JOBS = 200
WARMUP_S = 2.0
COOLDOWN_S = 2.0
# One thread per job: no run ever waits for a free worker, so the baseline's lateness is
# only that of spawning processes, which is what it is there to show.
BASELINE_WORKERS = JOBS
HEALTH_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
SPREAD_P99_TARGET_MS = 10.0
BURST_RATIO_TARGET = 1.25

WORKLOADS: dict[str, dict[str, Any]] = {
    "spread": {"every": "1s", "fuzzy": True},  # a stable offset per job: slots all over each second
    "burst": {"interval": "1s"},  # all 200 jobs at the same instant each second
}


class DaemonFailed(Exception):
    """The daemon could not be started (or stopped answering before it was healthy)."""


@dataclass(frozen=True)
class Plan:
    """One workload's jobs and the ledger they write to."""

    workload: str
    jobs: dict[str, dict[str, Any]]  # job id -> job file body
    ledger: Path

    def specs(self) -> list[JobSpec]:
        return [
            JobSpec.model_validate({**body, "id": job_id}) for job_id, body in self.jobs.items()
        ]


def make_plan(workload: str, workdir: Path, runner: str, jobs: int = JOBS) -> Plan:
    ledger = workdir / f"{runner}-{workload}.ledger"
    body = {
        "description": "bench",
        "policy": {"hosts": "any"},
        "schedule": WORKLOADS[workload],
        "shell": True,
        "command": ledger_command(ledger),
    }
    return Plan(workload, {f"{workload}-{i:03d}": body for i in range(jobs)}, ledger)


def make_window(seconds: float) -> tuple[datetime, datetime]:
    """[start, end): from the first whole second after the warm-up, `seconds` long."""
    start = datetime.fromtimestamp(int(time.time() + WARMUP_S) + 1, UTC)
    return start, start + timedelta(seconds=seconds)


def sleep_until(when: datetime) -> None:
    time.sleep(max(0.0, when.timestamp() - time.time()))


# --- /proc -------------------------------------------------------------------------------


def vm_hwm_kb(pid: int) -> int | None:
    """Peak resident set size of a live process, from /proc/<pid>/status."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


@dataclass(frozen=True)
class Proc:
    pid: int
    comm: str
    start_ticks: int  # with the pid, identifies the process even when pids are reused


def proc_info(pid: int) -> tuple[Proc, int] | None:
    """The process and its parent's pid, from /proc/<pid>/stat; None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm, fields = stat[stat.find("(") + 1 : stat.rfind(")")], stat[stat.rfind(")") + 2 :].split()
    return Proc(pid, comm, int(fields[19])), int(fields[1])


def descendants(pid: int) -> list[Proc]:
    """Every live descendant of `pid`."""
    children: dict[int, list[Proc]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (info := proc_info(int(entry.name))):
            children.setdefault(info[1], []).append(info[0])
    found: list[Proc] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child.pid)
    return found


def is_job(p: Proc) -> bool:
    return p.comm in ("sh", "date")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a live process (its own, not its children's)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def window_cpu_pct(pid: int, window: tuple[datetime, datetime]) -> float | None:
    """Sleep through the window; the process's CPU use in it, in % of one core."""
    sleep_until(window[0])
    before = cpu_seconds(pid)
    sleep_until(window[1])
    after = cpu_seconds(pid)
    if before is None or after is None:
        return None
    return 100.0 * (after - before) / (window[1] - window[0]).total_seconds()


# --- distcrond ---------------------------------------------------------------------------


@dataclass
class DaemonLog:
    levels: Counter[str]
    problems: Counter[str]  # "level: message" of warnings and worse, run ids and numbers masked
    finished: dict[str, float]  # run id -> time of its terminal-state log record


@dataclass
class DaemonRun:
    """What the daemon itself showed, beside the figures: for finding what is slow."""

    healthy_s: float  # from its start until /api/v1/health answered 200
    first_run_s: float | None  # from its start until the first run appeared in the ledger
    api_processes: int
    exit_code: int | None
    stop_s: float
    log: DaemonLog
    finish_lag_ms: tuple[float, float]  # p50, p99: a run's shell start -> its terminal log record
    stderr: Path


def daemon_argv() -> list[str]:
    script = Path(sys.executable).parent / "distcrond"
    return [str(script)] if script.exists() else [sys.executable, "-m", "distcrond"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(proc: subprocess.Popen[bytes], bind: str) -> None:
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DaemonFailed(f"distcrond exited with {proc.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(f"http://{bind}/api/v1/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise DaemonFailed(f"distcrond not healthy after {HEALTH_TIMEOUT_S:.0f} s")


def wait_first_run(proc: subprocess.Popen[bytes], ledger: Path) -> bool:
    """Healthy is not yet scheduling (it may not be leader yet): wait for a first run."""
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        if ledger.exists() and ledger.stat().st_size:
            return True
        time.sleep(0.02)
    return False


def stop_daemon(proc: subprocess.Popen[bytes]) -> tuple[int | None, float]:
    """SIGTERM, then SIGKILL after STOP_TIMEOUT_S; also kill what it left behind."""
    family = [p for p in descendants(proc.pid) if not is_job(p)]
    began = time.monotonic()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for p in family:  # orphans, if it did not stop its API server (and not a reused pid)
        if (info := proc_info(p.pid)) and info[0] == p:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
    return proc.returncode, time.monotonic() - began


_TEXT_LEVEL = re.compile(r"\[(DEBUG|INFO|WARNING|ERROR|CRITICAL)\]")
_MASKS = ((re.compile(r"\S+@\d{4}-\S+"), "<run>"), (re.compile(r"\d+(\.\d+)?"), "#"))
_TERMINAL = ("succeeded", "failed", "skipped", "missed", "unknown")


def read_log(stderr: Path) -> DaemonLog:
    """Levels and problems of the daemon's JSON log (and its API server's text log)."""
    log = DaemonLog(Counter(), Counter(), {})
    for line in stderr.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
            level, msg = str(record["level"]).lower(), str(record.get("msg", ""))
        except (ValueError, KeyError, TypeError):
            found = _TEXT_LEVEL.search(line)
            level, msg = (found.group(1).lower() if found else "text"), line
            record = {}
        log.levels[level] += 1
        if level not in ("debug", "info"):
            for pattern, mask in _MASKS:
                msg = pattern.sub(mask, msg)
            log.problems[f"{level}: {msg[:160]}"] += 1
        if record.get("run_id") and record.get("state") in _TERMINAL and "ts" in record:
            with contextlib.suppress(ValueError):
                ts = datetime.fromisoformat(record["ts"]).timestamp()
                log.finished.setdefault(record["run_id"], ts)
    return log


def run_distcrond(workload: str, seconds: float, workdir: Path) -> tuple[Figures, DaemonRun]:
    plan = make_plan(workload, workdir, "distcrond")
    root = workdir / f"distcrond-{workload}"
    jobs_dir, nodes_dir, state_dir = root / "jobs", root / "nodes", root / "state"
    for d in (jobs_dir, nodes_dir, state_dir):
        d.mkdir(parents=True)
    for job_id, body in plan.jobs.items():
        (jobs_dir / f"{job_id}.json").write_text(json.dumps(body))
    (nodes_dir / "local.json").write_text(json.dumps({"roles": [], "connection_type": "local"}))
    bind = f"127.0.0.1:{free_port()}"
    argv = [*daemon_argv(), "--jobs-dir", str(jobs_dir), "--nodes-dir", str(nodes_dir)]
    argv += ["--state-dir", str(state_dir), "--bind", bind, "--peer-id", "bench"]
    argv += ["--log-format", "json"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    stderr = root / "distcrond.stderr"
    began = time.monotonic()
    with stderr.open("wb") as err:
        proc = subprocess.Popen(
            argv, stdout=err, stderr=err, stdin=subprocess.DEVNULL, cwd=REPO, env=env
        )
    rss = api_rss = cpu = None
    api: list[Proc] = []
    try:
        wait_healthy(proc, bind)
        healthy_s = time.monotonic() - began
        ran = wait_first_run(proc, plan.ledger)
        if proc.poll() is not None:
            raise DaemonFailed(f"distcrond exited with {proc.returncode} soon after it started")
        first_run_s = time.monotonic() - began if ran else None
        window = make_window(seconds)
        cpu = window_cpu_pct(proc.pid, window)
        sleep_until(window[1] + timedelta(seconds=COOLDOWN_S))
        rss = vm_hwm_kb(proc.pid)
        api = [p for p in descendants(proc.pid) if not is_job(p)]
        api_rss = sum(vm_hwm_kb(p.pid) or 0 for p in api) if api else None
    finally:
        code, stop_s = stop_daemon(proc)
    ledger = read_ledger(plan.ledger)
    figures = measure("distcrond", workload, ledger, due_slots(plan.specs(), window), window)
    figures = Figures(**{**figures.as_dict(), "rss_kb": rss, "api_rss_kb": api_rss, "cpu_pct": cpu})
    log = read_log(stderr)
    lo, hi = window[0].timestamp(), window[1].timestamp()
    lags = sorted(
        (log.finished[e.run_id] - e.started) * 1000.0
        for e in ledger.entries
        if e.run_id in log.finished and lo <= e.slot_us / 1e6 < hi
    )
    lag = (percentile(lags, 50), percentile(lags, 99))
    run = DaemonRun(healthy_s, first_run_s, len(api), code, stop_s, log, lag, stderr)
    return figures, run


# --- baseline ----------------------------------------------------------------------------


def baseline_loop(plan: Plan, start: float, stop: float, workers: int, out: Connection) -> None:
    """The minimal scheduler: sleep until the earliest slot, hand every due one to a thread."""
    command, base_env = ledger_command(plan.ledger), dict(os.environ)

    def run(job_id: str, slot: datetime) -> None:
        env = {
            **base_env,
            "DISTCRON_RUN_ID": run_id_for(job_id, slot),
            "DISTCRON_SLOT": format_slot(slot),
        }
        subprocess.Popen(["/bin/sh", "-c", command], env=env).wait()

    specs = plan.specs()
    after = datetime.fromtimestamp(start, UTC)
    heap = []
    for i, job in enumerate(specs):
        slot = next_slot(job.schedule, job.id, after)
        heap.append((slot.timestamp(), i, slot))
    heapq.heapify(heap)
    with ThreadPoolExecutor(workers) as pool:
        while heap[0][0] < stop:
            time.sleep(max(0.0, heap[0][0] - time.time()))
            now = time.time()
            while heap[0][0] <= now:
                _, i, slot = heapq.heappop(heap)
                job = specs[i]
                pool.submit(run, job.id, slot)
                following = next_slot(job.schedule, job.id, slot)
                heapq.heappush(heap, (following.timestamp(), i, following))
    out.send(vm_hwm_kb(os.getpid()))


def run_baseline(
    workload: str, seconds: float, workdir: Path, workers: int, jobs: int = JOBS
) -> Figures:
    """The baseline in a process of its own, so that its peak RSS is its own."""
    plan = make_plan(workload, workdir, "baseline", jobs)
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    window = make_window(seconds)
    start = window[0].timestamp() - WARMUP_S
    stop = window[1].timestamp() + COOLDOWN_S
    child = ctx.Process(target=baseline_loop, args=(plan, start, stop, workers, send))
    child.start()
    cpu = window_cpu_pct(child.pid, window) if child.pid else None
    rss = receive.recv() if receive.poll(stop - time.time() + 60) else None
    child.join()
    figures = measure(
        "baseline", workload, read_ledger(plan.ledger), due_slots(plan.specs(), window), window
    )
    return Figures(**{**figures.as_dict(), "rss_kb": rss, "cpu_pct": cpu})


# --- report ------------------------------------------------------------------------------


def mb(kb: int | None) -> str:
    return f"{kb / 1024:.1f}" if kb is not None else "-"


def pct(value: float | None) -> str:
    return f"{value:.0f}" if value is not None else "-"


def print_table(results: list[Figures]) -> None:
    head = f"{'runner':<10} {'workload':<8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'missed':>7}"
    print(f"{head} {'dup':>5} {'runs/s':>7} {'CPU %':>6} {'RSS MB':>7} {'API RSS MB':>10}")
    for f in results:
        print(
            f"{f.runner:<10} {f.workload:<8} {f.p50_ms:8.2f} {f.p99_ms:8.2f} {f.max_ms:8.2f} "
            f"{f.missed:7d} {f.duplicated:5d} {f.runs_per_s:7.1f} {pct(f.cpu_pct):>6} "
            f"{mb(f.rss_kb):>7} {mb(f.api_rss_kb):>10}"
        )
    for f in results:
        if f.unexpected or f.malformed_lines:
            print(
                f"  note: {f.runner}/{f.workload}: {f.unexpected} runs of slots that were not due, "
                f"{f.malformed_lines} malformed ledger lines"
            )


def verdict(met: bool) -> str:
    return "TARGET MET" if met else "TARGET MISSED"


def targets(results: list[Figures]) -> list[dict[str, Any]]:
    by = {(f.runner, f.workload): f for f in results}
    found: list[dict[str, Any]] = []
    for workload in WORKLOADS:
        d, b = by.get(("distcrond", workload)), by.get(("baseline", workload))
        ratio = d.p99_ms / b.p99_ms if d and b and b.p99_ms > 0 else None
        if ratio is not None:
            print(f"{workload}: distcrond p99 / baseline p99 = {ratio:.2f}x", end="")
        if d and workload == "spread":
            met = d.p99_ms < SPREAD_P99_TARGET_MS
            print(
                f"   target: p99 < {SPREAD_P99_TARGET_MS:g} ms ({d.p99_ms:.2f} ms): {verdict(met)}"
            )
            found.append({"target": "spread p99 < 10 ms", "value_ms": d.p99_ms, "met": met})
        elif ratio is not None and workload == "burst":
            met = ratio <= BURST_RATIO_TARGET
            print(f"   target: within {BURST_RATIO_TARGET:.2f}x of baseline: {verdict(met)}")
            found.append({"target": "burst p99 within 1.25x baseline", "ratio": ratio, "met": met})
        elif ratio is not None:
            print()
    daemon = [f for f in results if f.runner == "distcrond"]
    if daemon:
        missed, dup = sum(f.missed for f in daemon), sum(f.duplicated for f in daemon)
        met = missed == 0 and dup == 0
        print(f"distcrond: {missed} missed, {dup} duplicated slots   target: zero: {verdict(met)}")
        found.append(
            {"target": "zero missed and duplicated", "missed": missed, "dup": dup, "met": met}
        )
    return found


def print_daemon(workload: str, run: DaemonRun) -> None:
    levels = ", ".join(f"{n} {level}" for level, n in sorted(run.log.levels.items())) or "nothing"
    first = f"{run.first_run_s:.1f} s" if run.first_run_s is not None else "never"
    print(
        f"  distcrond/{workload}: healthy after {run.healthy_s:.1f} s, first run after {first}; "
        f"stopped in {run.stop_s:.1f} s with exit code {run.exit_code}; "
        f"{run.api_processes} API processes"
    )
    print(
        f"    a run's terminal log record came {run.finish_lag_ms[0]:.0f} ms (p50), "
        f"{run.finish_lag_ms[1]:.0f} ms (p99) after its shell started; logged {levels}"
    )
    for problem, n in run.log.problems.most_common(4):
        print(f"    {n:5d} x {problem}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("distcrond", "baseline"), help="run one runner only")
    parser.add_argument(
        "--workload", choices=tuple(WORKLOADS), action="append", help="default: all"
    )
    parser.add_argument("--workers", type=int, default=BASELINE_WORKERS, help="baseline threads")
    args = parser.parse_args(argv)
    seconds = float(os.environ.get("BENCH_SECONDS", "30"))
    workdir = Path(tempfile.mkdtemp(prefix="distcrond-bench-"))
    keep = bool(os.environ.get("BENCH_KEEP"))
    print(
        f"distcrond standalone benchmark: {JOBS} jobs per workload, {seconds:g} s window "
        f"(after {WARMUP_S:g} s warm-up, before {COOLDOWN_S:g} s cool-down); "
        f"baseline: one process, {args.workers} threads; {os.cpu_count()} CPUs",
        flush=True,
    )
    results: list[Figures] = []
    daemons: dict[str, DaemonRun] = {}
    for workload in args.workload or list(WORKLOADS):
        if args.only != "baseline":
            try:
                figures, daemons[workload] = run_distcrond(workload, seconds, workdir)
            except DaemonFailed as e:
                stderr = workdir / f"distcrond-{workload}" / "distcrond.stderr"
                print(f"distcrond could not start: {e}\n  command: {' '.join(daemon_argv())} ...")
                print(f"  stderr: {stderr}")
                print("".join(stderr.read_text(errors="replace").splitlines(True)[-20:]), end="")
                return 2
            results.append(figures)
            print(f"  ran distcrond/{workload}", flush=True)
        if args.only != "distcrond":
            results.append(run_baseline(workload, seconds, workdir, args.workers))
            print(f"  ran baseline/{workload}", flush=True)
    print()
    print_table(results)
    print()
    found = targets(results)
    for workload, run in daemons.items():
        print_daemon(workload, run)
    trouble = any(f.missed or f.duplicated or f.unexpected for f in results) or any(
        r.exit_code != 0 or r.log.levels.get("error") or r.log.levels.get("critical")
        for r in daemons.values()
    )
    if out := os.environ.get("BENCH_OUT"):
        report = {
            "bench": "standalone",
            "jobs": JOBS,
            "seconds": seconds,
            "cpus": os.cpu_count(),
            "baseline_workers": args.workers,
            "results": [f.as_dict() for f in results],
            "targets": found,
        }
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"figures written to {out}")
    if trouble or keep:
        print(f"ledgers and daemon logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
