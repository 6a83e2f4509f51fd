"""The real `distcrond` command (gunicorn API, SQLite stores, real processes) on one host."""

from __future__ import annotations

import ctypes
import itertools
import os
import re
import signal
import socket
import stat
import subprocess
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from distcrond.reporting.sqlite import SQLiteReportStore
from distcrond.runs import parse_slot
from integration.peers import DISTCRONCTL, Peer, descendants, ledger_lines, pid_alive, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


LEDGER_LINE = '"$DISTCRON_RUN_ID $DISTCRON_SLOT $DISTCRON_PEER $DISTCRON_NODE"'


def ledger_job(ledger: Path, schedule: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "description": "appends its run id, slot and peer to a ledger",
        "policy": {"hosts": "any", "roles": ["web"]},
        "schedule": schedule,
        "shell": True,
        "command": f'echo "$DISTCRON_RUN_ID $DISTCRON_SLOT $DISTCRON_PEER $DISTCRON_NODE" '
        f">> {ledger}",
        **extra,
    }


def test_one_second_job_runs_every_slot_exactly_once(peer: Peer, tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    peer.write_job("tick", ledger_job(ledger, {"interval": "1s"}))
    peer.start()

    lines = wait_for(lambda: (ls := ledger_lines(ledger)) and len(ls) >= 6 and ls, 20, "6 runs")
    run_ids = [line[0] for line in lines]
    assert len(run_ids) == len(set(run_ids)), f"a slot ran twice: {run_ids}"
    slots = sorted(parse_slot(line[1]) for line in lines)
    gaps = {b - a for a, b in itertools.pairwise(slots)}
    assert gaps == {timedelta(seconds=1)}, f"slots skipped or out of grid: {slots}"
    assert all(s.microsecond == 0 for s in slots)
    assert {(line[2], line[3]) for line in lines} == {("peer-a", "local")}

    def listed() -> list[dict[str, Any]] | None:
        runs = peer.get("/api/v1/jobs/tick/runs", limit=100).json()["runs"]
        done = [r for r in runs if r["run_id"] in run_ids]
        return runs if len(done) == len(run_ids) else None

    runs = wait_for(listed, 10, "the API to list every run")
    assert all(r["state"] == "succeeded" for r in runs if r["run_id"] in run_ids)
    assert [r["slot"] for r in runs] == sorted((r["slot"] for r in runs), reverse=True)


def test_trigger_runs_a_job_now_and_reports_its_output(peer: Peer, tmp_path: Path) -> None:
    peer.write_job(
        "hello",
        {
            "schedule": {"interval": "24h", "reference": "03:00"},
            "command": ["/bin/sh", "-c", "echo out:$DISTCRON_RUN_ID; echo err >&2; exit 3"],
        },
    )
    peer.start()

    r = peer.post("/api/v1/jobs/hello/runs")
    assert r.status_code == 202, r.text
    run_id = r.json()["run_id"]
    assert run_id.startswith("hello@")

    run = peer.wait_run(run_id, ("succeeded", "failed"))
    assert run["state"] == "failed"
    assert run["exit_code"] == 3
    assert run["stdout"].strip() == f"out:{run_id}"
    assert run["stderr"].strip() == "err"
    assert run["node_id"] == "local" and run["peer_id"] == "peer-a"
    assert run["trigger"] == "manual"


def test_the_state_directory_and_its_files_are_private_to_the_daemon(
    peer: Peer, tmp_path: Path
) -> None:
    """Run output (reports, their WAL, the coordination records) and the tokens' hashes
    are readable by the daemon's user only: 0700 directories, 0600 files, under the
    umask it was started with (which it keeps for its jobs)."""
    umask = os.umask(0o022)
    os.umask(umask)
    peer.write_job(
        "secret",
        {"schedule": {"interval": "24h"}, "command": ["/bin/sh", "-c", "echo s3cr3t; umask"]},
    )
    peer.start()
    r = peer.post("/api/v1/jobs/secret/runs")
    assert r.status_code == 202, r.text
    run = peer.wait_run(r.json()["run_id"], ("succeeded", "failed"))
    assert run["stdout"].split() == ["s3cr3t", f"{umask:04o}"]  # the job's umask is untouched
    modes = {
        str(path.relative_to(peer.state_dir)): stat.S_IMODE(path.lstat().st_mode)
        for path in [peer.state_dir, *peer.state_dir.rglob("*")]
        if path.is_dir() or path.is_file()
    }
    assert "reports.sqlite3-wal" in modes, sorted(modes)
    loose = {
        name: oct(mode)
        for name, mode in modes.items()
        if mode != (0o700 if (peer.state_dir / name).is_dir() else 0o600)
    }
    assert loose == {}, loose


def test_a_peer_publishes_its_advertised_api_url(make_peer) -> None:  # type: ignore[no-untyped-def]
    peer: Peer = make_peer(extra_args=["--advertise-url", "http://cron-1.example.test:8080/"])
    peer.start()
    (published,) = peer.get("/api/v1/cluster").json()["peers"]
    assert published["peer_id"] == peer.peer_id
    assert published["api_url"] == "http://cron-1.example.test:8080"


def test_trigger_of_unknown_job_is_a_json_404(peer: Peer) -> None:
    peer.start()
    r = peer.post("/api/v1/jobs/nope/runs")
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("application/json")


def test_bad_file_is_reported_and_good_jobs_keep_running(peer: Peer, tmp_path: Path) -> None:
    good, edited = tmp_path / "good", tmp_path / "edited"
    peer.write_job("good", ledger_job(good, {"interval": "1s"}))
    peer.write_job("edited", ledger_job(edited, {"interval": "1s"}))
    peer.start()
    wait_for(lambda: ledger_lines(edited), 10, "the job to be edited to run once")

    peer.write_job("broken", '{"schedule": {"interval": "soon"}, "command": ["/bin/true"]}')
    bad_edit = ledger_job(edited, {"interval": "1s"})
    bad_edit["concurrency"] = "sometimes"
    peer.write_job("edited", bad_edit)

    def errors() -> list[dict[str, Any]] | None:
        errs = peer.get("/api/v1/config/errors").json()["errors"]
        return errs if len(errs) == 2 else None

    errs = {Path(e["file"]).name: e for e in wait_for(errors, 5, "both errors to be reported")}
    assert errs["broken.json"]["field"] == "schedule.interval"
    assert "soon" in errs["broken.json"]["reason"]
    assert errs["edited.json"]["field"] == "concurrency"

    # The good job and the last good version of the edited one keep running.
    before_good, before_edited = len(ledger_lines(good)), len(ledger_lines(edited))
    wait_for(lambda: len(ledger_lines(good)) >= before_good + 2, 10, "the good job to keep running")
    wait_for(
        lambda: len(ledger_lines(edited)) >= before_edited + 2,
        10,
        "the last good version to keep running",
    )
    jobs = {j["id"] for j in peer.get("/api/v1/jobs").json()["jobs"]}
    assert jobs == {"good", "edited"}


def test_new_job_file_is_picked_up_without_restart(peer: Peer, tmp_path: Path) -> None:
    peer.start()
    assert peer.get("/api/v1/jobs").json()["jobs"] == []
    ledger = tmp_path / "new"
    peer.write_job("new", ledger_job(ledger, {"interval": "1s"}))

    wait_for(
        lambda: [j for j in peer.get("/api/v1/jobs").json()["jobs"] if j["id"] == "new"],
        3,
        "the job in the API",
    )
    wait_for(lambda: ledger_lines(ledger), 5, "the new job to run")

    (peer.jobs_dir / "new.json").unlink()
    wait_for(lambda: peer.get("/api/v1/jobs").json()["jobs"] == [], 3, "the job to be dropped")
    settled = len(ledger_lines(ledger))
    # Removed: at most the run already recorded may still land.
    time.sleep(2.5)  # observation window for the absence of runs, not synchronisation
    assert len(ledger_lines(ledger)) <= settled + 1


def test_sigterm_stops_the_peer_and_leaves_no_child_process(make_peer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    peer: Peer = make_peer(extra_args=["--shutdown-grace", "1s"])
    peer.write_node("local", {"roles": [], "connection_type": "local"})
    pids = tmp_path / "pids"
    peer.write_job(
        "sleepy",
        {
            "schedule": {"interval": "24h"},
            "shell": True,
            # A grandchild in the background and a child in the foreground.
            "command": f"sleep 300 & echo $! >> {pids}; echo $$ >> {pids}; sleep 300",
        },
    )
    peer.start()
    run_id = peer.post("/api/v1/jobs/sleepy/runs").json()["run_id"]
    job_pids = wait_for(
        lambda: (p := ledger_lines(pids)) and len(p) == 2 and [int(x[0]) for x in p], 15, "pids"
    )
    assert peer.proc is not None
    family = descendants(peer.proc.pid)
    assert set(job_pids) <= set(family)
    assert len(family) > len(job_pids)  # the gunicorn arbiter and workers too

    assert peer.stop() == 0
    wait_for(lambda: not any(pid_alive(p) for p in family), 10, "every child to be gone")

    reports = SQLiteReportStore(peer.state_dir / "reports.sqlite3")
    try:
        report = reports.get(run_id)
    finally:
        reports.close()
    assert report is not None
    assert report.state.value == "failed"
    assert "shutting down" in report.reason


def test_second_peer_on_the_same_state_dir_refuses_to_start(peer: Peer, make_peer) -> None:  # type: ignore[no-untyped-def]
    peer.start()
    twin: Peer = make_peer("twin", root=peer.root)
    twin.start(wait=False)
    assert twin.proc is not None
    assert twin.proc.wait(20) == 2
    assert "state" in twin.log() and "lock" in twin.log().lower()


def test_missed_slots_follow_the_misfire_policy_after_a_restart(peer: Peer, tmp_path: Path) -> None:
    once, every = tmp_path / "once", tmp_path / "all"
    peer.write_job("once", ledger_job(once, {"interval": "1s"}, misfire="run_once"))
    peer.write_job("every", ledger_job(every, {"interval": "1s"}, misfire="run_all"))
    peer.start()
    wait_for(lambda: ledger_lines(once) and ledger_lines(every), 10, "both jobs to run")
    assert peer.stop() == 0
    stopped = datetime.now().astimezone()
    time.sleep(3.5)  # let slots fall due while no peer is leader: the condition under test
    peer.start()

    def settled() -> bool:
        after = [
            parse_slot(x[1])
            for x in ledger_lines(every)
            if parse_slot(x[1]) > stopped + timedelta(seconds=5)
        ]
        return bool(after)

    wait_for(settled, 15, "the peer to run past the gap")
    for ledger in (every,):
        slots = sorted({parse_slot(x[1]) for x in ledger_lines(ledger)})
        assert all(b - a == timedelta(seconds=1) for a, b in itertools.pairwise(slots)), slots

    def once_runs() -> list[dict[str, Any]]:
        return list(peer.get("/api/v1/jobs/once/runs", limit=200).json()["runs"])

    def caught_up_of(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in runs if r["trigger"] == "misfire" and r["state"] == "succeeded"]

    # The catch-up run is listed once it has finished, which may be after "every" ran on.
    wait_for(lambda: caught_up_of(once_runs()), 15, "the run_once catch-up to finish")
    runs = once_runs()
    missed = [r for r in runs if r["state"] == "missed"]
    caught_up = caught_up_of(runs)
    assert len(missed) >= 2 and len(caught_up) == 1
    assert max(m["slot"] for m in missed) < caught_up[0]["slot"]
    once_slots = sorted(parse_slot(x[1]) for x in ledger_lines(once))
    assert len(once_slots) == len(set(once_slots))


def test_slow_and_noisy_jobs_do_not_delay_other_jobs(peer: Peer, tmp_path: Path) -> None:
    ledger = tmp_path / "punctual"
    peer.write_job("punctual", ledger_job(ledger, {"interval": "1s"}))
    peer.write_job(
        "noisy",
        {
            "schedule": {"interval": "1s"},
            "concurrency": "allow",
            "command": ["head", "-c", "1000000000", "/dev/zero"],
        },
    )
    peer.write_job(
        "slow", {"schedule": {"interval": "1s"}, "concurrency": "allow", "command": ["sleep", "5"]}
    )
    peer.start()
    lines = wait_for(
        lambda: (ls := ledger_lines(ledger)) and len(ls) >= 6 and ls, 30, "6 punctual runs"
    )
    slots = sorted(parse_slot(x[1]) for x in lines)
    assert all(b - a == timedelta(seconds=1) for a, b in itertools.pairwise(slots)), slots
    noisy = peer.get("/api/v1/jobs/noisy/runs").json()["runs"]
    done = [r for r in noisy if r["state"] == "succeeded"]
    assert done, noisy
    assert done[0]["output_truncated"] is True
    assert len(done[0]["stdout"]) < 1024 * 1024 + 200


def test_distcronctl_lists_triggers_and_shows_runs(peer: Peer, tmp_path: Path) -> None:
    peer.write_job("hello", {"schedule": {"interval": "24h"}, "command": ["/bin/echo", "hi there"]})
    peer.start()
    env = {**os.environ, "DISTCRON_URL": peer.url}

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [DISTCRONCTL, *args], env=env, capture_output=True, text=True, timeout=30
        )

    jobs = ctl("jobs")
    assert jobs.returncode == 0, jobs.stderr
    assert "hello" in jobs.stdout
    trig = ctl("trigger", "hello")
    assert trig.returncode == 0, trig.stderr
    run_id = trig.stdout.strip().split()[-1]
    peer.wait_run(run_id, ("succeeded",))
    shown = ctl("run", run_id)
    assert "hi there" in shown.stdout and "succeeded" in shown.stdout
    missing = ctl("job", "nope")
    assert missing.returncode == 1 and "nope" in missing.stderr


def test_make_run_examples_are_valid(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1] / "deploy" / "examples"
    out = subprocess.run(
        [
            str(Path(DISTCRONCTL).with_name("distcrond")),
            "--check",
            "--jobs-dir",
            str(root / "jobs.d"),
            "--nodes-dir",
            str(root / "nodes.d"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 errors" in out.stdout


def test_sigint_stops_the_peer_like_sigterm(peer: Peer) -> None:
    peer.start()
    peer.signal(signal.SIGINT)
    assert peer.proc is not None
    assert peer.proc.wait(30) == 0


def test_sigterm_received_by_a_thread_other_than_the_main_one_stops_the_peer(
    peer: Peer,
) -> None:
    """Python runs signal handlers on the main thread only: the daemon must notice a
    SIGTERM that the kernel handed to any of its threads (tgkill picks one here)."""
    peer.start()
    assert peer.proc is not None
    pid = peer.proc.pid
    other = next(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.tgkill(pid, other, signal.SIGTERM) == 0, os.strerror(ctypes.get_errno())
    assert peer.proc.wait(10) == 0


def test_run_interrupted_by_a_crash_ends_unknown_and_is_not_run_again(
    peer: Peer, tmp_path: Path
) -> None:
    starts = tmp_path / "starts"
    peer.write_job(
        "crashy",
        {
            "schedule": {"interval": "24h"},
            "shell": True,
            "command": f"echo $$ >> {starts}; exec sleep 300",
        },
    )
    peer.start()
    run_id = peer.post("/api/v1/jobs/crashy/runs").json()["run_id"]
    (pid,) = wait_for(lambda: [int(x[0]) for x in ledger_lines(starts)], 15, "the run to start")
    peer.signal(signal.SIGKILL)
    assert peer.proc is not None
    peer.proc.wait(10)
    os.kill(pid, signal.SIGKILL)  # a crashed peer cannot stop its children; the test does

    peer.start()
    run = peer.wait_run(run_id, ("unknown",))
    assert "outcome unknown" in run["reason"]
    assert len(ledger_lines(starts)) == 1


def test_the_objects_built_at_start_are_frozen_out_of_full_collections(peer: Peer) -> None:
    """The daemon freezes what it built at start (gc.freeze), so that Python's full
    collections, which hold the interpreter, walk only what was made since."""
    peer.start()
    line = wait_for(
        lambda: re.search(r"froze (\d+) objects built at start", peer.log()), 10, "the log line"
    )
    # modules, classes, config and clients: tens of thousands of objects
    assert int(line.group(1)) > 10_000


def test_api_address_in_use_is_a_clear_startup_error(peer: Peer) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", peer.port))
        squatter.listen()
        peer.start(wait=False)
        assert peer.proc is not None
        assert peer.proc.wait(30) == 2
    assert f"cannot listen on 127.0.0.1:{peer.port}" in peer.log()
