"""Elasticsearch benchmark: reports per second through the spool, and history queries at 1M runs.

Run from the repository root: ``python -m integration.bench.es`` (``make bench``). It
starts its own single-node Elasticsearch on 127.0.0.1:9450 (the distribution cached in
var/services/elasticsearch/dist, as for the tests), prints figures and ratios against
baselines measured in the same run, and stops it. It is not a test.

* **ingest**: ``BENCH_REPORTS`` reports (default 20,000; 500 bytes of output each)
  written by 8 threads, one report per ``write`` call as runs end, into the daemon's
  store: the spool in front of the Elasticsearch store, timed until the spool is
  empty (every report accepted by Elasticsearch). Baseline: the same reports sent
  with one ``index`` request each (the same 8 threads, the same documents and ids).
* **query**: ``BENCH_STORED`` runs (default 1,000,000: 1,000 jobs x 1,000 hourly
  slots, over two monthly indices) loaded through the store; then a job's last 50
  runs, the page after them, its last 50 failed runs, and a word searched in the
  output of every job, each asked 200 times for random jobs (p50/p99 ms). Baseline:
  the same queries with 10,000 runs stored (10 jobs), in the same node.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from elasticsearch import Elasticsearch

from deploy.services.elasticsearch import DEFAULT_DIST_DIR, http_json
from deploy.services.elasticsearch import Elasticsearch as ElasticsearchNode
from distcrond.reporting.base import RunQuery
from distcrond.reporting.elasticsearch import ElasticsearchReportStore
from distcrond.reporting.spool import SpooledReportStore
from distcrond.runs import RunReport, RunState, run_id_for
from integration.bench.ledger import percentile

PORT = int(os.environ.get("BENCH_ES_PORT", "9450"))
WRITERS = 8
QUERIES = 200
T0 = datetime(2026, 10, 1, tzinfo=UTC)
OUTPUT = ("copied 1523 files, 48213 bytes; " * 16)[:480] + "\n"


def report(job: int, k: int, *, failed_every: int = 10) -> RunReport:
    slot = T0 + timedelta(hours=k, seconds=job % 3600)
    job_id = f"job{job:04d}"
    failed = k % failed_every == 0
    return RunReport(
        run_id=run_id_for(job_id, slot),
        job_id=job_id,
        slot=slot,
        state=RunState.FAILED if failed else RunState.SUCCEEDED,
        node_id=f"node{job % 7}",
        peer_id=f"peer-{job % 3 + 1}",
        attempts=1,
        started_at=slot + timedelta(milliseconds=3),
        ended_at=slot + timedelta(milliseconds=850),
        exit_code=1 if failed else 0,
        reason="exit status 1" if failed else "",
        stdout=OUTPUT if not failed else "disk full on /srv\n",
        stderr="",
    )


def reports(jobs: int, per_job: int) -> Iterator[RunReport]:
    for k in range(per_job):
        for job in range(jobs):
            yield report(job, k)


def store(url: str, prefix: str) -> ElasticsearchReportStore:
    return ElasticsearchReportStore([url], index_prefix=prefix, refresh=False)


def refresh(url: str, prefix: str) -> None:
    http_json(f"{url}/{prefix}*/_refresh", method="POST", timeout=120)


def count(url: str, prefix: str) -> int:
    refresh(url, prefix)
    status, body = http_json(f"{url}/{prefix}*/_count", timeout=60)
    return int(body["count"]) if status == 200 else -1


# -- ingest ---------------------------------------------------------------------------------


def in_threads(items: list[RunReport], call: Callable[[RunReport], None]) -> None:
    with ThreadPoolExecutor(WRITERS) as pool:
        for _ in pool.map(call, items):
            pass


def ingest_spooled(url: str, workdir: Path, n: int) -> dict[str, float]:
    prefix = "bench-spool-"
    items = list(reports(100, n // 100))
    spooled = SpooledReportStore(store(url, prefix), workdir / "spool")
    try:
        started = time.monotonic()
        in_threads(items, lambda r: spooled.write([r]))
        written = time.monotonic() - started
        if not spooled.flush(timeout=600):
            raise RuntimeError(f"the spool did not drain: {spooled.stats()}")
        took = time.monotonic() - started
    finally:
        spooled.close()
    stored = count(url, prefix)
    return {
        "reports": len(items),
        "stored": stored,
        "seconds": took,
        "reports_per_s": len(items) / took,
        "spool_appends_per_s": len(items) / written,
    }


def ingest_one_by_one(url: str, n: int) -> dict[str, float]:
    """The baseline: one index request per report, the store's documents and ids."""
    prefix = "bench-single-"
    items = list(reports(100, n // 100))
    target = store(url, prefix)
    target.write(items[:1])  # installs the template, like the spooled run's first write
    client = Elasticsearch([url])  # thread-safe: one connection pool shared by the writers

    def index(r: RunReport) -> None:
        client.index(index=target.index_for(r.slot), id=r.run_id, document=target.document(r))

    started = time.monotonic()
    in_threads(items, index)
    took = time.monotonic() - started
    target.close()
    client.close()
    return {
        "reports": len(items),
        "stored": count(url, prefix),
        "seconds": took,
        "reports_per_s": len(items) / took,
    }


# -- queries --------------------------------------------------------------------------------


def load(url: str, prefix: str, jobs: int, per_job: int) -> float:
    target = store(url, prefix)
    started = time.monotonic()
    batch: list[RunReport] = []
    for r in reports(jobs, per_job):
        batch.append(r)
        if len(batch) == 5000:
            target.write(batch)
            batch = []
    if batch:
        target.write(batch)
    took = time.monotonic() - started
    http_json(f"{url}/{prefix}*/_forcemerge?max_num_segments=8", method="POST", timeout=600)
    refresh(url, prefix)
    target.close()
    return took


def timed(call: Callable[[], Any]) -> float:
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1000.0


def queries(url: str, prefix: str, jobs: int) -> dict[str, dict[str, float]]:
    target = store(url, prefix)
    rng = random.Random(7)
    names = [f"job{rng.randrange(jobs):04d}" for _ in range(QUERIES)]
    found: dict[str, list[float]] = {"last 50": [], "next page": [], "failed": [], "text": []}
    for job_id in names[:20]:  # warm-up
        target.list_runs(RunQuery(job_id=job_id, limit=50))
    for job_id in names:
        first = target.list_runs(RunQuery(job_id=job_id, limit=50))
        assert len(first.runs) == 50 and first.next_cursor, (job_id, len(first.runs))
        found["last 50"].append(
            timed(lambda j=job_id: target.list_runs(RunQuery(job_id=j, limit=50)))
        )
        found["next page"].append(
            timed(
                lambda j=job_id, c=first.next_cursor: target.list_runs(
                    RunQuery(job_id=j, limit=50, cursor=c)
                )
            )
        )
        found["failed"].append(
            timed(
                lambda j=job_id: target.list_runs(
                    RunQuery(job_id=j, states=(RunState.FAILED,), limit=50)
                )
            )
        )
    for _ in range(QUERIES):
        found["text"].append(timed(lambda: target.list_runs(RunQuery(text="disk full", limit=50))))
    target.close()
    out = {}
    for name, values in found.items():
        values.sort()
        out[name] = {"p50_ms": percentile(values, 50), "p99_ms": percentile(values, 99)}
    return out


# -- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--reports", type=int, default=int(os.environ.get("BENCH_REPORTS", "20000"))
    )
    parser.add_argument(
        "--stored", type=int, default=int(os.environ.get("BENCH_STORED", "1000000"))
    )
    parser.add_argument("--only", choices=("ingest", "query"))
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="distcrond-es-bench-"))
    workdir.chmod(0o755)  # the node runs as the unprivileged distcron-es user
    node = ElasticsearchNode(workdir / "es", port=PORT, dist_dir=DEFAULT_DIST_DIR)
    figures: dict[str, Any] = {}
    print(
        f"distcrond Elasticsearch benchmark: single node on 127.0.0.1:{PORT} (512 MB heap), "
        f"{os.cpu_count()} CPUs",
        flush=True,
    )
    try:
        node.start(timeout=180)
        if args.only != "query":
            spooled = ingest_spooled(node.url, workdir, args.reports)
            single = ingest_one_by_one(node.url, args.reports)
            figures["ingest"] = {"spooled_bulk": spooled, "index_per_report": single}
            print()
            print(f"ingest: {args.reports} reports, {WRITERS} writer threads, one report per call")
            print(f"{'way':<28}{'reports/s':>12}{'seconds':>10}{'stored':>10}")
            for name, f in (("spool + bulk (distcrond)", spooled), ("index per report", single)):
                print(
                    f"{name:<28}{f['reports_per_s']:>12.0f}{f['seconds']:>10.1f}{f['stored']:>10}"
                )
            print(f"  spool appends (durable, fsynced): {spooled['spool_appends_per_s']:.0f}/s")
            ratio = spooled["reports_per_s"] / single["reports_per_s"]
            print(f"  spool + bulk / index per report = {ratio:.2f}x")
            figures["ingest"]["ratio"] = ratio
        if args.only != "ingest":
            per_job = 1000
            jobs = max(1, args.stored // per_job)
            big_s = load(node.url, "bench-big-", jobs, per_job)
            small_s = load(node.url, "bench-small-", 10, per_job)
            stored = count(node.url, "bench-big-")
            big = queries(node.url, "bench-big-", jobs)
            small = queries(node.url, "bench-small-", 10)
            figures["query"] = {"stored": stored, "load_seconds": big_s, "big": big, "small": small}
            print()
            print(
                f"query: {stored} runs stored ({jobs} jobs x {per_job}; loaded through the store "
                f"in {big_s:.0f} s = {stored / big_s:.0f} reports/s) against 10,000 "
                f"({small_s:.1f} s); {QUERIES} queries each"
            )
            head = ("p50 ms", "p99 ms", "base p50", "base p99", "p99 ratio")
            print(f"{'query':<14}" + "".join(f"{h:>10}" for h in head))
            for name in big:
                b, s = big[name], small[name]
                print(
                    f"{name:<14}{b['p50_ms']:>10.1f}{b['p99_ms']:>10.1f}{s['p50_ms']:>10.1f}"
                    f"{s['p99_ms']:>10.1f}{b['p99_ms'] / s['p99_ms']:>9.2f}x"
                )
    finally:
        node.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    if out := os.environ.get("BENCH_OUT"):
        Path(out).write_text(json.dumps({"bench": "elasticsearch", **figures}, indent=2) + "\n")
        print(f"figures written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
