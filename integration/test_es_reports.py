"""The Elasticsearch report store against the real test node: its template and mapping,
where documents go, idempotence, bounded valid output, outages and refusals.

The contract every report store keeps is tested in tests/contract/test_reports.py;
these are the Elasticsearch specifics.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from deploy.services.elasticsearch import http_json
from distcrond.coordination.base import StoreUnavailable
from distcrond.reporting.base import ReportRejected, RunQuery
from distcrond.reporting.elasticsearch import MAPPING, ElasticsearchReportStore
from distcrond.runs import RunReport, RunState, run_id_for

pytestmark = [pytest.mark.integration, pytest.mark.elasticsearch, pytest.mark.timeout(300)]

JAN = datetime(2025, 1, 31, 23, 59, 59, 123_456, tzinfo=UTC)
MiB = 1024 * 1024

MakeStore = Callable[..., ElasticsearchReportStore]


def report(job_id: str, slot: datetime, **fields: Any) -> RunReport:
    return RunReport(
        run_id=run_id_for(job_id, slot),
        job_id=job_id,
        slot=slot,
        state=fields.pop("state", RunState.SUCCEEDED),
        node_id="n1",
        peer_id="p1",
        started_at=slot + timedelta(seconds=1),
        ended_at=slot + timedelta(seconds=3),
        exit_code=0,
        **fields,
    )


def es(url: str, path: str, method: str = "GET", body: Any = None) -> tuple[int, Any]:
    return http_json(f"{url}/{path}", method=method, body=body)


def indices(url: str, prefix: str) -> list[str]:
    status, body = es(url, f"_cat/indices/{prefix}*?format=json&h=index")
    assert status == 200, body
    return sorted(row["index"] for row in body)


@pytest.fixture
def make_store(es_url: str, es_index_prefix: str) -> Iterator[MakeStore]:
    """Build stores on the test node (this test's prefix unless told); at the end, close
    them and delete the templates they installed."""
    made: list[ElasticsearchReportStore] = []

    def build(**options: Any) -> ElasticsearchReportStore:
        options.setdefault("index_prefix", es_index_prefix)
        options.setdefault("refresh", True)
        store = ElasticsearchReportStore([es_url], **options)
        made.append(store)
        return store

    yield build
    for store in made:
        store.close()
        es(es_url, f"_index_template/{store.template_name}", method="DELETE")


def test_the_index_has_the_explicit_strict_mapping_and_settings(
    make_store: MakeStore, es_url: str, es_index_prefix: str
) -> None:
    store = make_store()
    store.write([report("backup", JAN, stdout="hello", extra={"anything": {"deep": [1, "x"]}})])
    index = f"{es_index_prefix}2025.01"

    status, body = es(es_url, f"{index}/_mapping")
    assert status == 200, body
    mapping = body[index]["mappings"]
    types = {name: field.get("type", "object") for name, field in mapping["properties"].items()}

    assert mapping["dynamic"] == "strict"
    assert types == {
        **dict.fromkeys(["run_id", "job_id", "node_id", "peer_id", "state", "trigger"], "keyword"),
        **dict.fromkeys(["triggered_by", "cancelled_by"], "keyword"),
        **dict.fromkeys(["slot", "started_at", "ended_at"], "date_nanos"),
        **dict.fromkeys(["slot_us", "duration_ms", "exit_code", "attempts"], "long"),
        "output_truncated": "boolean",
        **dict.fromkeys(["stdout", "stderr", "reason"], "text"),
        "extra": "object",
    }
    assert mapping["properties"]["extra"]["enabled"] is False  # nothing under it is mapped
    assert "properties" not in mapping["properties"]["extra"]

    status, body = es(es_url, f"{index}/_settings")
    settings = body[index]["settings"]["index"]
    assert (settings["number_of_shards"], settings["number_of_replicas"]) == ("1", "0")

    # dynamic: strict refuses a field the mapping does not name.
    status, body = es(
        es_url,
        f"{index}/_doc/intruder",
        method="PUT",
        body={**store.document(report("other", JAN)), "surprise": 1},
    )
    assert status == 400, body
    assert body["error"]["type"] == "strict_dynamic_mapping_exception"


def test_an_index_made_by_an_older_version_gains_the_fields_added_since(
    make_store: MakeStore, es_url: str, es_index_prefix: str
) -> None:
    """Its mapping is strict: without the new fields, every report that names who
    triggered or cancelled it would be refused for good."""
    index = f"{es_index_prefix}2025.01"
    old_fields = {
        k: v for k, v in MAPPING["properties"].items() if k not in ("triggered_by", "cancelled_by")
    }
    status, body = es(
        es_url,
        index,
        method="PUT",
        body={"mappings": {"dynamic": "strict", "properties": old_fields}},
    )
    assert status == 200, body

    store = make_store()
    store.write([report("backup", JAN, triggered_by="ops", cancelled_by="oncall")])

    got = store.get(run_id_for("backup", JAN))
    assert got is not None and (got.triggered_by, got.cancelled_by) == ("ops", "oncall")


def test_the_template_is_installed_before_the_first_write(
    make_store: MakeStore, es_url: str
) -> None:
    store = make_store()
    assert es(es_url, f"_index_template/{store.template_name}")[0] == 404  # lazily

    store.write([report("backup", JAN)])

    status, body = es(es_url, f"_index_template/{store.template_name}")
    assert status == 200, body
    template = body["index_templates"][0]["index_template"]
    assert template["index_patterns"] == [f"{store.index_prefix}*"]
    assert template["priority"] == 200


def test_the_index_is_chosen_from_the_slot(
    make_store: MakeStore, es_url: str, es_index_prefix: str
) -> None:
    # Its own prefix: templates of the same priority may not match the same names.
    daily_prefix = f"distcron-test-{uuid.uuid4().hex[:12]}-"
    monthly = make_store()
    daily = make_store(index_prefix=daily_prefix, index_period="day")
    late = report("backup", JAN)  # written today, whatever today is

    monthly.write([late, report("backup", datetime(2025, 2, 1, tzinfo=UTC))])
    daily.write([late])

    assert indices(es_url, es_index_prefix) == [
        f"{es_index_prefix}2025.01",
        f"{es_index_prefix}2025.02",
    ]
    assert indices(es_url, daily_prefix) == [f"{daily_prefix}2025.01.31"]
    status, body = es(es_url, f"{es_index_prefix}2025.01/_doc/{late.run_id}")
    assert status == 200 and body["_source"]["run_id"] == late.run_id
    assert monthly.get(late.run_id) == late
    assert daily.get(late.run_id) == late


def test_listing_pages_across_indices_newest_slot_first(make_store: MakeStore) -> None:
    store = make_store(index_period="day")
    slots = [datetime(2025, 1, 1, tzinfo=UTC) + timedelta(hours=7 * i) for i in range(40)]
    store.write([report(f"job{i % 3}", s) for i, s in enumerate(slots)])

    ids: list[str] = []
    page = store.list_runs(RunQuery(limit=7))
    ids += [r.run_id for r in page.runs]
    while page.next_cursor:
        page = store.list_runs(RunQuery(limit=7, cursor=page.next_cursor))
        ids += [r.run_id for r in page.runs]

    expected = [run_id_for(f"job{i % 3}", s) for i, s in enumerate(slots)]
    assert ids == expected[::-1]


def test_a_write_repeated_makes_one_document(
    make_store: MakeStore, es_url: str, es_index_prefix: str
) -> None:
    store = make_store()
    r = report("backup", JAN, stdout="same")

    for _ in range(3):
        store.write([r])

    status, body = es(es_url, f"{es_index_prefix}*/_count")
    assert status == 200 and body["count"] == 1
    assert store.list_runs(RunQuery()).runs == [r]


def test_huge_invalid_output_is_stored_bounded_and_valid(
    make_store: MakeStore, es_url: str, es_index_prefix: str
) -> None:
    store = make_store()
    limit = store.max_output_bytes
    assert limit == MiB
    chunk = b"line \xff\xfe ok \xc3 caf\xc3\xa9 \xe2\x82 \xf0\x9f\x98\x80 end\n"  # bad + good
    raw = b"FIRST " + chunk * (10 * MiB // len(chunk)) + b" LAST"
    captured = raw.decode("utf-8", "surrogateescape")  # as the runner decodes it
    assert len(raw) > 10 * MiB and "\udcff" in captured
    r = report("backup", JAN, stdout=captured, stderr=captured, reason="exit status 1")

    store.write([r])

    url = f"{es_url}/{es_index_prefix}2025.01/_doc/{urllib.request.quote(r.run_id, safe='')}"
    with urllib.request.urlopen(url, timeout=30) as response:
        body = response.read()
    source = json.loads(body.decode("utf-8"))["_source"]  # strict UTF-8, valid JSON
    assert source["output_truncated"] is True
    for name in ("stdout", "stderr"):
        text = source[name]
        text.encode("utf-8")  # no lone surrogate survived
        assert len(text.encode("utf-8")) <= limit
        assert text.startswith("FIRST line \ufffd\ufffd ok \ufffd café \ufffd 😀 end\n")
        assert text.endswith(" end\n LAST")
        assert "bytes cut by the report store ...]" in text
        assert "\udcff" not in text and "\ufffd" in text
    assert source["reason"] == "exit status 1"

    stored = store.get(r.run_id)
    assert stored is not None and stored.output_truncated
    assert stored.stdout == source["stdout"]


def test_an_unreachable_server_makes_the_store_unavailable_not_the_constructor() -> None:
    store = ElasticsearchReportStore(["http://127.0.0.1:1"], request_timeout=2.0)
    r = report("backup", JAN)
    started = time.monotonic()

    with pytest.raises(StoreUnavailable, match=re.escape("127.0.0.1:1")):
        store.write([r])
    with pytest.raises(StoreUnavailable):
        store.get(r.run_id)
    with pytest.raises(StoreUnavailable):
        store.list_runs(RunQuery())
    status = store.status()
    store.close()

    assert not status.ok and status.backend == "elasticsearch"
    assert "127.0.0.1:1" in status.detail
    assert time.monotonic() - started < 60


def test_status_of_the_test_node_is_ok(make_store: MakeStore, es_url: str) -> None:
    status = make_store().status()
    assert status.ok, status.detail
    assert es_url in status.detail


def test_a_report_refused_for_good_is_named_and_the_others_are_stored(
    make_store: MakeStore, es_url: str, es_index_prefix: str
) -> None:
    # An index made by hand where job_id is a number: a job named "backup" cannot go in.
    status, body = es(
        es_url,
        f"{es_index_prefix}2026.11",
        method="PUT",
        body={"mappings": {"properties": {"job_id": {"type": "long"}}}},
    )
    assert status == 200, body
    store = make_store()
    refused = report("backup", datetime(2026, 11, 27, 3, 10, tzinfo=UTC))
    same_index = report("1234", datetime(2026, 11, 27, 3, 10, tzinfo=UTC))
    other_index = report("backup", datetime(2026, 10, 27, 3, 10, tzinfo=UTC))

    with pytest.raises(ReportRejected) as caught:
        store.write([refused, same_index, other_index])

    assert set(caught.value.rejected) == {refused.run_id}
    assert "job_id" in caught.value.rejected[refused.run_id]
    assert store.get(refused.run_id) is None
    assert store.get(same_index.run_id) == same_index
    assert store.get(other_index.run_id) == other_index


def test_a_report_the_server_asks_to_retry_makes_the_batch_unavailable(
    make_store: MakeStore, es_url: str, es_index_prefix: str
) -> None:
    # read_only_allow_delete is the flood-stage block: writes answer 429, retry later.
    index = f"{es_index_prefix}2026.11"
    store = make_store()
    blocked = report("backup", datetime(2026, 11, 27, 3, 10, tzinfo=UTC))
    elsewhere = report("backup", datetime(2026, 10, 27, 3, 10, tzinfo=UTC))
    store.write([blocked])
    status, body = es(
        es_url, f"{index}/_settings", "PUT", {"index.blocks.read_only_allow_delete": True}
    )
    assert status == 200, body
    newer = report("backup", blocked.slot, state=RunState.FAILED)

    try:
        with pytest.raises(StoreUnavailable, match="429"):
            store.write([newer, elsewhere])
    finally:
        es(es_url, f"{index}/_settings", "PUT", {"index.blocks.read_only_allow_delete": None})

    assert store.get(elsewhere.run_id) == elsewhere  # the item that could go in, went in
    store.write([newer, elsewhere])  # the caller's retry of the whole batch
    assert store.get(blocked.run_id) == newer
    assert [r.run_id for r in store.list_runs(RunQuery()).runs] == [
        blocked.run_id,
        elsewhere.run_id,
    ]
