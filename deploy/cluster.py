"""`make cluster`: three distcrond peers on loopback against the local ZooKeeper ensemble.

Peers peer-1, peer-2, peer-3 serve their APIs on 127.0.0.1:8081, 8082, 8083,
run the example jobs and nodes (deploy/examples), keep their state under
var/cluster/<peer>/ and log to var/cluster/<peer>.log. The ensemble is the one
``make services`` starts (127.0.0.1:2181-2183). Runs in the foreground:
Ctrl-C (or SIGTERM) stops the three peers the way systemd would, with SIGTERM.

Try: kill one peer (``kill -9 <pid>``, printed at start) and watch
``distcronctl --url http://127.0.0.1:8082 cluster`` elect another leader.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import FrameType

REPO = Path(__file__).resolve().parent.parent
DISTCROND = str(Path(sys.executable).with_name("distcrond"))


def peer_argv(n: int, args: argparse.Namespace) -> list[str]:
    return [
        DISTCROND,
        "--peer-id",
        f"peer-{n}",
        "--bind",
        f"127.0.0.1:{args.base_port + n - 1}",
        "--jobs-dir",
        str(args.jobs_dir),
        "--nodes-dir",
        str(args.nodes_dir),
        "--state-dir",
        str(args.dir / f"peer-{n}"),
        "--zookeeper",
        args.zookeeper,
        "--zk-root",
        args.zk_root,
        *(["--es-url", args.es_url] if args.es_url else []),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=3)
    parser.add_argument("--base-port", type=int, default=8081)
    parser.add_argument("--zookeeper", default="127.0.0.1:2181,127.0.0.1:2182,127.0.0.1:2183")
    parser.add_argument("--zk-root", default="/distcron")
    parser.add_argument(
        "--es-url",
        default="http://127.0.0.1:9200",
        help="Elasticsearch for the run reports (make services starts it); '' for none",
    )
    parser.add_argument("--jobs-dir", type=Path, default=REPO / "deploy/examples/jobs.d")
    parser.add_argument("--nodes-dir", type=Path, default=REPO / "deploy/examples/nodes.d")
    parser.add_argument("--dir", type=Path, default=REPO / "var/cluster")
    args = parser.parse_args(argv)

    args.dir.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    for n in range(1, args.peers + 1):
        log_path = args.dir / f"peer-{n}.log"
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                peer_argv(n, args), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        procs.append(proc)
        print(
            f"peer-{n}: pid {proc.pid}, API http://127.0.0.1:{args.base_port + n - 1}/api/v1/, "
            f"log {log_path}",
            flush=True,
        )
    print(
        f"cluster of {args.peers} on ZooKeeper {args.zookeeper}{args.zk_root}; try:\n"
        f"  {Path(sys.executable).with_name('distcronctl')} --url "
        f"http://127.0.0.1:{args.base_port} cluster\n(Ctrl-C stops the peers)",
        flush=True,
    )
    exited: set[int] = set()
    while not stop.wait(0.5) and len(exited) < len(procs):
        for n, proc in enumerate(procs, 1):
            if proc.poll() is not None and n not in exited:
                exited.add(n)  # reported once, not restarted: a crash is for the operator to see
                print(f"peer-{n} exited with {proc.returncode}; see its log", flush=True)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        proc.wait()
    print("cluster stopped", flush=True)
    return 0


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(main())
