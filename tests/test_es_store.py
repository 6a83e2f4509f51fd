"""The Elasticsearch report store without a server: documents, bounding, index names,
constructor checks, and what reaches the wire (a tiny local HTTP server plays the node)."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import given
from hypothesis import strategies as st

from distcrond.reporting.elasticsearch import (
    CUT_MARKER,
    MAPPING,
    ElasticsearchReportStore,
    bound_text,
    index_name,
    valid_unicode,
)
from distcrond.runs import RunReport, RunState, run_id_for

SLOT = datetime(2025, 1, 31, 23, 59, 59, 999_999, tzinfo=UTC)
MARKER_TEXT = "bytes cut by the report store"


def store(**options: object) -> ElasticsearchReportStore:
    return ElasticsearchReportStore(["http://127.0.0.1:1"], **options)  # type: ignore[arg-type]


def report(**fields: object) -> RunReport:
    base: dict[str, object] = dict(
        run_id=run_id_for("backup", SLOT), job_id="backup", slot=SLOT, state=RunState.SUCCEEDED
    )
    base.update(fields)
    return RunReport(**base)  # type: ignore[arg-type]


def escaped(data: bytes) -> str:
    """Output as the capture decodes it."""
    return data.decode("utf-8", "surrogateescape")


# -- valid Unicode -----------------------------------------------------------------------


def test_valid_text_is_returned_unchanged() -> None:
    text = "héllo ✓ 日本語 \x1b[31m\n"
    assert valid_unicode(text) is text


def test_escaped_invalid_bytes_become_replacement_characters() -> None:
    text = escaped(b"ok \xff then \xc3 and \xe2\x82 end")

    cleaned = valid_unicode(text)

    assert cleaned == "ok \ufffd then \ufffd and \ufffd end"
    cleaned.encode("utf-8")  # strict: no surrogate left


def test_escaped_bytes_that_form_a_character_are_decoded_as_it() -> None:
    # A multi-byte character split by a read boundary and escaped byte by byte.
    assert valid_unicode("caf\udcc3\udca9") == "café"


def test_other_lone_surrogates_become_replacement_characters() -> None:
    assert valid_unicode("a\ud800b\udfffc\udc7fd\udd00e") == "a\ufffdb\ufffdc\ufffdd\ufffde"
    assert valid_unicode("\ud83d\ude00") == "\ufffd\ufffd"  # a pair split in two code points


# -- bounding ----------------------------------------------------------------------------


def test_text_within_the_limit_is_kept_whole() -> None:
    assert bound_text("x" * 100, 100) == ("x" * 100, False)


def test_a_cut_keeps_head_and_tail_around_a_marker_counting_the_cut_bytes() -> None:
    text = "HEAD" + "m" * 10_000 + "TAIL"

    bounded, cut = bound_text(text, 1000)

    assert cut
    assert len(bounded.encode()) <= 1000
    head, marker_rest = bounded.split("\n[... ", 1)
    marker, tail = marker_rest.split(" ...]\n", 1)
    assert text.startswith(head) and head.startswith("HEAD")
    assert text.endswith(tail) and tail.endswith("TAIL")
    assert abs(len(head) - len(tail)) <= 1  # about half the room each
    assert marker == f"{len(text) - len(head) - len(tail)} {MARKER_TEXT}"
    assert bounded == head + CUT_MARKER.format(len(text) - len(head) - len(tail)) + tail


def test_the_limit_is_in_utf8_bytes_and_cuts_fall_between_characters() -> None:
    text = "é" * 5000 + "日本語" * 1000  # 2 and 3 bytes per character

    bounded, cut = bound_text(text, 1001)

    assert cut
    data = bounded.encode("utf-8")
    assert len(data) <= 1001
    head, rest = bounded.split("\n[... ", 1)
    tail = rest.split(" ...]\n", 1)[1]
    assert set(head) == {"é"} and text.endswith(tail) and tail
    cut_bytes = int(rest.split(" ", 1)[0])
    assert cut_bytes == len(text.encode()) - len(head.encode()) - len(tail.encode())


def test_a_limit_smaller_than_the_marker_keeps_only_the_head() -> None:
    bounded, cut = bound_text("日本語" * 100, 10)

    assert cut
    assert bounded == "日本語"  # 9 bytes: a 4th character would not fit


@given(text=st.text(), limit=st.integers(min_value=1, max_value=300))
def test_bounded_text_is_always_within_the_limit(text: str, limit: int) -> None:
    bounded, cut = bound_text(text, limit)

    assert len(bounded.encode("utf-8")) <= limit
    assert cut == (len(text.encode("utf-8")) > limit)


# -- documents ---------------------------------------------------------------------------


def test_a_document_has_exactly_the_mapped_fields() -> None:
    doc = store().document(report(started_at=SLOT, ended_at=SLOT + timedelta(seconds=1)))

    assert set(doc) == set(MAPPING["properties"])
    assert doc["slot_us"] == 1738367999999999
    assert doc["duration_ms"] == 1000


def test_a_document_bounds_and_cleans_output_and_marks_it_truncated() -> None:
    big = escaped(b"\xff" + b"a" * 5000 + b"\xc3")
    doc = store(max_output_bytes=1000).document(
        report(stdout=big, stderr="short", reason="r" * 2000, extra={"k\udcff": ["v\ud800"]})
    )

    assert doc["output_truncated"] is True
    assert doc["stdout"].startswith("\ufffdaaa") and doc["stdout"].endswith("aaa\ufffd")
    assert len(doc["stdout"].encode()) <= 1000 and MARKER_TEXT in doc["stdout"]
    assert doc["stderr"] == "short"
    assert len(doc["reason"].encode()) <= 1000 and MARKER_TEXT in doc["reason"]
    assert doc["extra"] == {"k\ufffd": ["v\ufffd"]}
    json.dumps(doc, ensure_ascii=False).encode("utf-8")  # strict: valid UTF-8 JSON


def test_a_document_keeps_the_reports_own_truncation_flag() -> None:
    assert store().document(report(output_truncated=True))["output_truncated"] is True
    assert store().document(report(stdout="small"))["output_truncated"] is False


# -- index names -------------------------------------------------------------------------


def test_the_index_is_named_from_the_slot_in_utc() -> None:
    paris_morning = datetime(2025, 2, 1, 0, 30, tzinfo=timezone(timedelta(hours=1)))

    assert index_name("p-", "month", SLOT) == "p-2025.01"
    assert index_name("p-", "day", SLOT) == "p-2025.01.31"
    assert index_name("p-", "month", paris_morning) == "p-2025.01"  # 23:30 UTC
    assert index_name("p-", "day", paris_morning) == "p-2025.01.31"
    assert store(index_period="day").index_for(SLOT) == "distcron-runs-2025.01.31"
    assert store().index_for(SLOT) == "distcron-runs-2025.01"


@pytest.mark.parametrize("period", ["week", "Month", "", "year"])
def test_an_unknown_index_period_is_refused(period: str) -> None:
    with pytest.raises(ValueError, match=repr(period)):
        store(index_period=period)


@pytest.mark.parametrize("prefix", ["", "Runs-", "runs*", "-runs", "a,b-", "a b"])
def test_an_index_prefix_that_cannot_name_an_index_is_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match="index name"):
        store(index_prefix=prefix)


# -- the client ----------------------------------------------------------------------------


class _FakeNode(BaseHTTPRequestHandler):
    """Answers GET /_cluster/health like an Elasticsearch node; records the headers."""

    seen: list[dict[str, str]] = []

    def do_GET(self) -> None:
        _FakeNode.seen.append({k.lower(): v for k, v in self.headers.items()})
        body = json.dumps({"cluster_name": "fake", "status": "green"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Elastic-Product", "Elasticsearch")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def fake_node() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeNode)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _FakeNode.seen = []
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_basic_auth_reaches_the_server_and_never_the_status_detail(fake_node: str) -> None:
    s = ElasticsearchReportStore([fake_node], username="distcron", password="s3cret-pw")

    status = s.status()
    s.close()

    assert status.ok and fake_node in status.detail
    expected = base64.b64encode(b"distcron:s3cret-pw").decode()
    assert _FakeNode.seen[-1]["authorization"] == f"Basic {expected}"
    assert "s3cret-pw" not in status.detail and "distcron:" not in status.detail


def test_an_api_key_reaches_the_server_and_never_the_status_detail(fake_node: str) -> None:
    s = ElasticsearchReportStore([fake_node], api_key="a2V5LWlkOmtleS1zZWNyZXQ=")

    status = s.status()
    s.close()

    assert status.ok
    assert _FakeNode.seen[-1]["authorization"] == "ApiKey a2V5LWlkOmtleS1zZWNyZXQ="
    assert "a2V5" not in status.detail


def test_credentials_in_a_url_are_not_shown() -> None:
    s = ElasticsearchReportStore(["http://admin:hunter2@127.0.0.1:1"])

    status = s.status()  # nothing listens on port 1

    assert not status.ok
    assert "127.0.0.1:1" in status.detail
    assert "hunter2" not in status.detail and "admin" not in status.detail


def test_close_is_idempotent() -> None:
    s = store()
    s.close()
    s.close()
    assert not s.status().ok
