"""SSH benchmark: runs per second of a trivial command on one SSH node.

Three ways, in the same run, against one real sshd on 127.0.0.5 (started here):

* **pooled** — distcrond's ``SSHRunner`` as the daemon uses it: authenticated
  transports reused across runs, a channel per run;
* **new connection** — the same runner with pooling off: TCP, key exchange and
  authentication for every run;
* **ssh ControlMaster** (the reference) — OpenSSH's ``ssh`` command line with
  connection multiplexing (``ControlMaster=auto``, ``ControlPersist``), one
  process per run.

Each is measured serially (one run after the other: the cost of one run) and
with ``--concurrency`` runs at once (throughput). Prints runs/s and the ratios
to the reference. Run from the repository root: ``python -m integration.bench.ssh``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from deploy.services.sshd import SSHHost, SSHServers
from distcrond.config.models import NodeSpec
from distcrond.execution.base import RunRequest
from distcrond.execution.ssh import SSHRunner

ADDRESS = "127.0.0.5"
PORT = int(os.environ.get("BENCH_SSH_PORT", "2522"))


def node_spec(host: SSHHost) -> NodeSpec:
    return NodeSpec.model_validate({"id": "bench", **host.node_file([], max_concurrent_runs=64)})


def runner_call(runner: SSHRunner, spec: NodeSpec) -> Callable[[], bool]:
    def run() -> bool:
        request = RunRequest(
            run_id=f"bench@{uuid.uuid4().hex}",
            job_id="bench",
            node_id=spec.id,
            peer_id="bench",
            slot=datetime.now(UTC),
            argv=("true",),
            node=spec,
        )
        return runner.run(request).ok

    return run


def control_master_call(host: SSHHost, control_dir: Path) -> Callable[[], bool]:
    base = host.ssh_command()  # ssh [options] destination, no remote command yet
    options = [
        "-o",
        "ControlMaster=auto",
        "-o",
        f"ControlPath={control_dir}/%C",
        "-o",
        "ControlPersist=120",
    ]

    def run() -> bool:
        argv = [*base[:1], *options, *base[1:], "true"]
        return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True).returncode == 0

    return run


def measure(call: Callable[[], bool], runs: int, concurrency: int) -> tuple[float, int]:
    """(runs per second, failures) of ``runs`` calls, ``concurrency`` at a time."""
    call()  # warm up: the first connection is not what is measured
    began = time.monotonic()
    if concurrency == 1:
        results = [call() for _ in range(runs)]
    else:
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(lambda _: call(), range(runs)))
    elapsed = time.monotonic() - began
    return runs / elapsed, results.count(False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=int(os.environ.get("BENCH_SSH_RUNS", "200")))
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args(argv)

    # paramiko logs refused channel opens (retried) at ERROR; they are not failures here.
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)
    workdir = Path(tempfile.mkdtemp(prefix="distcrond-ssh-bench-"))
    servers = SSHServers(workdir / "sshd", addresses=(ADDRESS,), port=PORT)
    figures: dict[str, dict[str, float]] = {}
    try:
        servers.start()
        host = servers.host(ADDRESS)
        spec = node_spec(host)
        control_dir = workdir / "cm"
        control_dir.mkdir()
        pooled, fresh = SSHRunner(), SSHRunner(pooled=False)
        ways = {
            "pooled (distcrond)": runner_call(pooled, spec),
            "new connection per run": runner_call(fresh, spec),
            "ssh ControlMaster (reference)": control_master_call(host, control_dir),
        }
        for name, call in ways.items():
            serial, serial_failed = measure(call, args.runs, 1)
            wide, wide_failed = measure(call, args.runs, args.concurrency)
            figures[name] = {
                "serial_runs_per_s": serial,
                "concurrent_runs_per_s": wide,
                "failures": serial_failed + wide_failed,
            }
        pooled.close()
        fresh.close()
        subprocess.run(
            [
                *host.ssh_command()[:1],
                "-o",
                f"ControlPath={control_dir}/%C",
                "-O",
                "exit",
                host.destination,
            ],
            capture_output=True,
        )
    finally:
        servers.stop()
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(workdir, ignore_errors=True)

    reference = figures["ssh ControlMaster (reference)"]
    print(f"\nSSH: `true` on one node ({ADDRESS}:{PORT}), {args.runs} runs each way")
    print(
        f"{'way':32} {'serial runs/s':>14} {'ratio':>7} {f'x{args.concurrency} runs/s':>14} "
        f"{'ratio':>7} {'failures':>9}"
    )
    for name, f in figures.items():
        print(
            f"{name:32} {f['serial_runs_per_s']:14.1f} "
            f"{f['serial_runs_per_s'] / reference['serial_runs_per_s']:7.2f} "
            f"{f['concurrent_runs_per_s']:14.1f} "
            f"{f['concurrent_runs_per_s'] / reference['concurrent_runs_per_s']:7.2f} "
            f"{int(f['failures']):9d}"
        )
    pooled_f, fresh_f = figures["pooled (distcrond)"], figures["new connection per run"]
    saved_ms = 1000 / fresh_f["serial_runs_per_s"] - 1000 / pooled_f["serial_runs_per_s"]
    print(
        f"reuse saves {saved_ms:.1f} ms per run (serial): pooled is "
        f"{pooled_f['serial_runs_per_s'] / fresh_f['serial_runs_per_s']:.1f}x a new connection"
    )
    if out := os.environ.get("BENCH_OUT"):
        Path(out).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
