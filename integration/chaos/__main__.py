"""``python -m integration.chaos``: set up, run the workload under the nemesis, check, report.

Exit status: 0 when no invariant was violated and every bounded recovery was within
its bound; 1 otherwise (the evidence is printed and the work directory, with the
peers' logs, is kept); 2 when the setup failed. Every process, nft table and
cgroup it made is removed at exit, on Ctrl-C and on SIGTERM too.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import FrameType

from integration.chaos.faults import KINDS, parse_kinds
from integration.chaos.nemesis import Nemesis, heal_all, run_nemesis
from integration.chaos.run import check, wait_workload
from integration.chaos.services import PEERS, Services, SetupFailed
from integration.chaos.summary import exit_status, render_evidence, render_table, to_json
from integration.chaos.workload import Workload, install, make_workload

SESSION_TIMEOUT_S = 4.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m integration.chaos", description=__doc__)
    parser.add_argument("--seconds", type=float, default=90.0, help="nemesis phase length")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--nemesis", default="", help=f"KIND[,KIND...] of: {', '.join(KINDS)}")
    parser.add_argument("--out", type=Path, help="JSON file (default var/chaos/chaos-SEED.json)")
    parser.add_argument("--workdir", type=Path, help="default: a fresh temporary directory")
    parser.add_argument(
        "--bound-slack",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="fail on a recovery later than its bound + SECONDS only (default 0: the bounds; "
        "every recovery over its bound is printed either way)",
    )
    return parser.parse_args(argv)


def say(message: str) -> None:
    print(message, flush=True)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def setup(services: Services, workdir: Path) -> tuple[Path, Workload]:
    cluster = services.start()
    ledger = workdir / "ledger.txt"
    workload = make_workload(ledger, services.sshd.hosts)
    install(workload, cluster, services.sshd.hosts)
    services.start_peers()
    wait_workload(workload, timeout=60)
    return ledger, workload


def run(services: Services, args: argparse.Namespace, kinds: list[str], rng: random.Random) -> int:
    """Setup, workload and nemesis, check, report; the exit status."""
    try:
        _ledger, workload = setup(services, services.workdir)
    except (SetupFailed, AssertionError) as e:
        say(f"chaos: setup failed: {e}")
        return 2
    nem = Nemesis(services, rng, say)
    started = time.time()
    say(f"chaos: workload running; nemesis for {args.seconds:g} s")
    run_nemesis(nem, kinds, args.seconds)
    ended = time.time()
    heal_all(services)
    verdict = check(services, workload, nem, (started, ended), args, say)
    out: Path = args.out or Path("var/chaos") / f"chaos-{args.seed}.json"
    report = to_json(verdict) | {"workdir": str(services.workdir)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report | {"clock_peer": services.clock_peer}, indent=2) + "\n")
    say("\n" + render_table(verdict))
    status = exit_status(verdict)
    evidence = render_evidence(verdict)
    if evidence:
        say(("\nviolations:\n" if status else "\nover their bound:\n") + evidence)
    say(f"\nchaos: JSON in {out}; {'OK' if status == 0 else 'VIOLATIONS'}")
    return status


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        kinds = parse_kinds(args.nemesis)
    except ValueError as e:
        say(str(e))
        return 2
    rng = random.Random(args.seed)
    fresh = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="distcron-chaos-")) if fresh else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    if not fresh and any(workdir.iterdir()):
        say(f"chaos: --workdir {workdir} is not empty (ZooKeeper and ES data would be reused)")
        return 2
    clock_peer = rng.choice([f"peer-{n}" for n in range(1, PEERS + 1)])
    say(f"chaos: seed {args.seed}, {args.seconds:g} s, kinds {', '.join(kinds)}")
    say(f"chaos: session timeout S = {SESSION_TIMEOUT_S:g} s; {clock_peer} on a fake clock")
    say(f"chaos: work directory {workdir}")
    for signum in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: `cmd &` ignores it
        signal.signal(signum, _terminate)
    services = Services(workdir, SESSION_TIMEOUT_S, clock_peer)
    status = 2
    try:
        status = run(services, args, kinds, rng)
    except KeyboardInterrupt:
        say("chaos: interrupted")
    except Exception:
        traceback.print_exc()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut cleanup
            signal.signal(signum, signal.SIG_IGN)
        services.close()
        if status == 0 and fresh:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            say(f"chaos: work directory kept (peer logs): {workdir}")
    return status


if __name__ == "__main__":
    sys.exit(main())
