"""Reading what the stores recorded: run states through the peers' API, reports in Elasticsearch.

* :func:`report_counts`: every report document in ``distcron-runs-*`` (after a
  refresh), as run id -> number of documents (``_id`` is the run id, so more than
  one can only come from several indices) and run id -> state.
* :func:`record_states`: each expected run's recorded state: first the jobs'
  listings (``GET /api/v1/jobs/{id}/runs``, the report store), then for the runs
  still missing ``GET /api/v1/runs/{run_id}`` (it falls back to the coordination
  store).
* :func:`settle`: polls both until every expected run has a terminal record and
  every executed run a report, or the deadline passes; returns the last reading.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import quote

import requests

from deploy.services.elasticsearch import http_json
from distcrond.runs import format_slot
from integration.chaos.checker import TERMINAL
from integration.peers import Peer

INDICES = "distcron-runs-*"
PAGE = 5000
# While settling, at most this many GET /api/v1/runs/{id} per reading for runs no listing
# had (more missing means a stopped cluster; the last reading looks every one up).
SETTLING_LOOKUPS = 300


@dataclass
class Reading:
    """One look at the stores."""

    states: dict[str, str | None] = field(default_factory=dict)
    reports: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)


def report_counts(es_url: str) -> tuple[Counter[str], dict[str, str]]:
    """Report documents per run id, and each run's reported state."""
    http_json(f"{es_url}/{INDICES}/_refresh", method="POST")
    counts: Counter[str] = Counter()
    states: dict[str, str] = {}
    after: list[object] | None = None
    for _ in range(1000):
        body: dict[str, object] = {
            "size": PAGE,
            "_source": ["run_id", "state"],
            "sort": [{"slot_us": "asc"}, {"run_id": "asc"}],
        }
        if after is not None:
            body["search_after"] = after
        status, reply = http_json(f"{es_url}/{INDICES}/_search", method="POST", body=body)
        if status == 404:
            break
        if status != 200:
            raise RuntimeError(f"search answered {status}: {str(reply)[:300]}")
        hits = reply["hits"]["hits"]
        for hit in hits:
            counts[hit["_source"]["run_id"]] += 1
            states[hit["_source"]["run_id"]] = hit["_source"]["state"]
        if len(hits) < PAGE:
            break
        after = hits[-1]["sort"]
    return counts, states


def _iso(epoch_s: float) -> str:
    return format_slot(datetime.fromtimestamp(epoch_s, UTC))


def listed_states(peer: Peer, job_id: str, window: tuple[float, float]) -> dict[str, str]:
    """Run id -> state of a job's runs in the window (active and finished), every page."""
    found: dict[str, str] = {}
    params = {"since": _iso(window[0]), "until": _iso(window[1] + 1), "limit": "1000"}
    for _ in range(100):
        reply = peer.get(f"/api/v1/jobs/{job_id}/runs", **params)
        reply.raise_for_status()
        body = reply.json()
        for run in body.get("active", []) + body.get("runs", []):
            found[run["run_id"]] = run["state"]
        if not body.get("next_cursor"):
            break
        params["cursor"] = body["next_cursor"]
    return found


def single_state(peer: Peer, run_id: str) -> str | None:
    reply = peer.get(f"/api/v1/runs/{quote(run_id, safe='')}")
    if reply.status_code == 404:
        return None
    reply.raise_for_status()
    state = reply.json().get("state")
    return str(state) if state is not None else None


def record_states(
    peer: Peer,
    jobs: Iterable[str],
    expected: list[str],
    window: tuple[float, float],
    lookups: int | None = None,
) -> dict[str, str | None]:
    """The recorded state of each expected run (None: no record found), and of every
    other run the listings hold (a ``hosts: all`` slot skipped as a whole, say)."""
    listed: dict[str, str] = {}
    for job_id in jobs:
        listed.update(listed_states(peer, job_id, window))
    states: dict[str, str | None] = {**listed, **{r: listed.get(r) for r in expected}}
    missing = [r for r in expected if states[r] not in TERMINAL]
    for run_id in missing[:lookups]:
        states[run_id] = single_state(peer, run_id) or states[run_id]
    return states


def settle(
    read: Callable[[], Reading],
    done: Callable[[Reading], bool],
    timeout: float,
    say: Callable[[str], None],
    interval: float = 2.0,
) -> Reading:
    """Read until ``done`` or ``timeout`` seconds; the last reading either way."""
    deadline = time.monotonic() + timeout
    reading = Reading()
    while True:
        try:
            reading = read()
        except (requests.RequestException, RuntimeError, OSError, KeyError) as e:
            reading = Reading(errors=[repr(e)])
            say(f"  (reading the stores failed: {e!r})")
        if not reading.errors and done(reading):
            return reading
        if time.monotonic() >= deadline:
            return reading
        time.sleep(interval)
