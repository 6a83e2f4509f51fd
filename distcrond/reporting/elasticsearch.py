"""The Elasticsearch report store: one document per run, in one index per month (or day).

Layout
------
* **Index template.** Before its first write a store installs (``PUT
  _index_template/<prefix>template``) a composable template for ``<prefix>*``,
  priority 200, with an explicit mapping and ``dynamic: "strict"``: a field the
  mapping does not name is refused, so a bug cannot grow the mapping. Identifiers
  (``run_id``, ``job_id``, ``node_id``, ``peer_id``, ``state``, ``trigger``) are
  ``keyword``; ``stdout``, ``stderr`` and ``reason`` are ``text`` (standard
  analyzer: ``RunQuery.text`` finds words, case-insensitively); ``attempts``,
  ``duration_ms``, ``exit_code`` and ``slot_us`` are ``long``;
  ``output_truncated`` is ``boolean``; ``extra`` is an object with ``enabled:
  false`` (kept in ``_source``, never indexed, so it cannot break the mapping).
  Settings: 1 shard, 0 replicas, which suits the single node this is tested on;
  on a real cluster, raise ``number_of_replicas`` in the template (or put it in a
  template of higher priority; an existing index takes ``PUT <index>/_settings``).
  The template also sorts each index by ``slot_us desc, run_id desc`` (the listing
  order) so that a page can stop reading a segment early. The template is
  installed again by every new store instance (the daemon's start), which is how a
  new mapping reaches the next index created. Prefixes must not overlap
  (``distcron-runs-`` and ``distcron-runs-eu-``): Elasticsearch refuses a second
  template of the same priority matching the same names, and ``write`` then raises
  StoreUnavailable with its reason until the configuration is fixed.
* **Dates.** ``slot``, ``started_at`` and ``ended_at`` are ``date_nanos``. Slots and
  run times carry microseconds; ``date`` would index them truncated to the
  millisecond, so a range query on ``slot`` (Kibana, an operator's curl) could
  disagree with the slot in the run id. ``date_nanos`` holds them exactly; its range
  (1970 to 2262) is no limit for runs. The store itself filters and sorts on
  ``slot_us`` (the slot in integer microseconds since the epoch, exact, cheap to
  compare, and what the cursor holds).
* **One index per period of the slot.** A run goes to ``<prefix>YYYY.MM``
  (``index_period="month"``, the default) or ``<prefix>YYYY.MM.DD`` (``"day"``),
  from its *slot* in UTC, never from the time of writing: a run reported late,
  or written again, lands in the same index as before.
* **_id = run id.** Writes are ``index`` actions of one ``bulk`` request, each
  with ``_id`` = the run id: writing a report again (the spool replays batches
  after an outage) replaces it, never duplicates it. ``get`` is a real-time GET
  by id on the index that the run id's slot names.
* **Retention** is deleting old indices, one period at a time::

      curl -X DELETE http://127.0.0.1:9200/distcron-runs-2025.01

  (or an ILM/curator policy on ``distcron-runs-*``).
* **Listing** searches ``<prefix>*`` sorted by ``slot_us desc, run_id desc`` (the
  contract's order), ``size = limit + 1`` (the extra hit tells whether a next page
  exists), ``track_total_hits: false``, and continues with ``search_after`` from
  the cursor, which encodes ``(slot_us, run_id)`` of the page's last run exactly as
  the SQLite store does (:func:`~distcrond.reporting.base.encode_cursor`). Keyset
  paging costs the same on page one and page ten thousand: no ``from``, no total.
  ``RunQuery.text`` is a ``multi_match`` of type ``cross_fields`` with operator
  ``and`` over ``stdout`` and ``stderr``: every word must appear in one of the
  two, not necessarily the same.
* **Output is bounded and valid.** ``stdout``, ``stderr`` and ``reason`` are each
  cut to at most ``max_output_bytes`` UTF-8 bytes, keeping the head and the tail
  around a visible marker (``[... N bytes cut by the report store ...]``), and
  ``output_truncated`` is then set. The capture decodes output with
  ``surrogateescape``; its escaped bytes (U+DC80..U+DCFF) are turned back into
  bytes and decoded with replacement, and any other lone surrogate becomes U+FFFD,
  so every document is valid UTF-8 JSON (the ``extra`` strings too).

Errors
------
``write`` raises :class:`~distcrond.coordination.base.StoreUnavailable` when the
request fails as a whole (connection refused, timeout, any HTTP error status of
the bulk or template request: 429/5xx, but also 401/403 or an oversized request,
which a retry after the operator's fix can cure, and which must not drop reports),
and when any item answers 429 or 5xx. It raises
:class:`~distcrond.reporting.base.ReportRejected` when items were refused for good
(4xx: a mapping error...) and none needs a retry; the other reports were stored.
When some items need a retry and others were refused, it raises StoreUnavailable:
the caller retries the whole batch, which is safe (``_id`` = run id), and the
refused ones are reported as refused on a retry that gets that far.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from elasticsearch import ApiError, Elasticsearch, TransportError

from distcrond.coordination.base import StoreStatus, StoreUnavailable
from distcrond.reporting.base import (
    ReportRejected,
    ReportStore,
    RunPage,
    RunQuery,
    decode_cursor,
    encode_cursor,
)
from distcrond.runs import RunReport, RunState, split_run_id
from distcrond.sqlitedb import to_us

log = logging.getLogger(__name__)

MAX_LIMIT = 1000
TEMPLATE_PRIORITY = 200
STATUS_TIMEOUT = 2.0  # seconds: status() answers quickly, even when the cluster does not
# One bulk request stays below this many bytes of documents (http.max_content_length
# is 100 MB by default); a larger batch is sent as several requests, one after another.
MAX_REQUEST_BYTES = 32 * 1024 * 1024
PERIODS = {"month": "%Y.%m", "day": "%Y.%m.%d"}
BOUNDED_FIELDS = ("stdout", "stderr", "reason")
CUT_MARKER = "\n[... {} bytes cut by the report store ...]\n"

_DATE = {"type": "date_nanos", "format": "strict_date_optional_time_nanos"}
MAPPING: dict[str, Any] = {
    "dynamic": "strict",
    "properties": {
        "run_id": {"type": "keyword"},
        "job_id": {"type": "keyword"},
        "node_id": {"type": "keyword"},
        "peer_id": {"type": "keyword"},
        "state": {"type": "keyword"},
        "trigger": {"type": "keyword"},
        "slot": _DATE,
        "slot_us": {"type": "long"},
        "started_at": _DATE,
        "ended_at": _DATE,
        "duration_ms": {"type": "long"},
        "exit_code": {"type": "long"},
        "attempts": {"type": "long"},
        "output_truncated": {"type": "boolean"},
        "stdout": {"type": "text"},
        "stderr": {"type": "text"},
        "reason": {"type": "text"},
        "triggered_by": {"type": "keyword"},
        "cancelled_by": {"type": "keyword"},
        "extra": {"type": "object", "enabled": False},
    },
}
# Fields added to MAPPING after the first release, added to older indices at start.
ADDED_FIELDS = ("triggered_by", "cancelled_by")
SETTINGS: dict[str, Any] = {
    "number_of_shards": 1,
    "number_of_replicas": 0,  # single node; raise it through the template on a cluster
    "sort.field": ["slot_us", "run_id"],
    "sort.order": ["desc", "desc"],
}

# Lone surrogates that are not surrogateescape's escaped bytes (U+DC80..U+DCFF).
_OTHER_SURROGATES = re.compile("[\ud800-\udc7f\udd00-\udfff]")
_INDEX_PREFIX_FORBIDDEN = set(' "*\\<|,>/?#:')


def valid_unicode(text: str) -> str:
    """``text`` as valid Unicode: surrogateescape's escaped bytes decoded with
    replacement (valid sequences of them become their characters again), every
    other lone surrogate U+FFFD. Text that is valid already is returned as is."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    text = _OTHER_SURROGATES.sub("\ufffd", text)
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def bound_text(text: str, max_bytes: int) -> tuple[str, bool]:
    """(``text`` in at most ``max_bytes`` UTF-8 bytes, whether it was cut).

    ``text`` must be valid Unicode (:func:`valid_unicode`). A cut keeps the head and
    the tail (about half the room each) around :data:`CUT_MARKER`, which says how
    many bytes went; the pieces end on character boundaries. When not even the
    marker fits, only the head is kept.
    """
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text, False
    room = max_bytes - len(CUT_MARKER.format(len(data)).encode())  # the widest marker
    if room <= 0:
        return data[: max(max_bytes, 0)].decode("utf-8", "ignore"), True
    head = data[: room - room // 2].decode("utf-8", "ignore")  # drops a split character
    tail = data[len(data) - room // 2 :].decode("utf-8", "ignore") if room // 2 else ""
    cut = len(data) - len(head.encode()) - len(tail.encode())
    return head + CUT_MARKER.format(cut) + tail, True


def _valid(value: Any) -> Any:
    """``value`` (JSON: dicts, lists, scalars) with every string made valid Unicode."""
    if isinstance(value, str):
        return valid_unicode(value)
    if isinstance(value, dict):
        return {_valid(k): _valid(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_valid(v) for v in value]
    return value


def check_index_prefix(prefix: str) -> str:
    """``prefix`` if it can start an Elasticsearch index name, else ValueError saying why."""
    if (
        not prefix
        or prefix != prefix.lower()
        or prefix[0] in "-_+."
        or _INDEX_PREFIX_FORBIDDEN & set(prefix)
    ):
        raise ValueError(
            f"{prefix!r} cannot start an Elasticsearch index name: it must be lowercase, "
            'not start with -, _, + or ., and hold none of \\ / * ? " < > | , # : or a space'
        )
    return prefix


def index_name(prefix: str, period: str, slot: datetime) -> str:
    """The index of a run whose slot is ``slot``: ``<prefix>YYYY.MM`` or ``<prefix>YYYY.MM.DD``."""
    if period not in PERIODS:
        raise ValueError(f"index_period must be 'month' or 'day', not {period!r}")
    if slot.tzinfo is None:
        raise ValueError("slots are timezone-aware datetimes")
    return prefix + slot.astimezone(UTC).strftime(PERIODS[period])


def _redact(url: str) -> str:
    """``url`` without credentials (``user:password@``)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid url>"
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    return urlunsplit(parts._replace(netloc=netloc))


def _reason(error: Any) -> str:
    if isinstance(error, dict):
        kind, why = error.get("type", "error"), error.get("reason", "")
        return f"{kind}: {why}" if why else str(kind)
    return str(error)


class ElasticsearchReportStore(ReportStore):
    """Run reports in Elasticsearch 8 (see the module docstring for the layout).

    Thread-safe (the client is). The constructor does not connect: the daemon may
    start before Elasticsearch does. ``refresh`` is passed to every bulk request
    (``"wait_for"`` or True make a write visible to ``list_runs`` when it returns;
    False, for the daemon, leaves it to the index's refresh interval, about 1 s;
    ``get`` is real-time either way).
    """

    backend = "elasticsearch"

    def __init__(
        self,
        urls: Sequence[str],
        *,
        index_prefix: str = "distcron-runs-",
        index_period: str = "month",
        username: str | None = None,
        password: str | None = None,
        api_key: str | None = None,
        ca_certs: str | None = None,
        verify_certs: bool = True,
        request_timeout: float = 10.0,
        refresh: bool | str = False,
        max_output_bytes: int = 1048576,
    ) -> None:
        if isinstance(urls, str):
            urls = [urls]
        if not urls:
            raise ValueError("at least one Elasticsearch URL is needed")
        if index_period not in PERIODS:
            raise ValueError(f"index_period must be 'month' or 'day', not {index_period!r}")
        check_index_prefix(index_prefix)
        if max_output_bytes < 1:
            raise ValueError(f"max_output_bytes must be positive, not {max_output_bytes}")
        self.urls = tuple(urls)
        self.index_prefix = index_prefix
        self.index_period = index_period
        self.refresh = refresh
        self.max_output_bytes = max_output_bytes
        self.template_name = f"{index_prefix}template"
        self._where = ", ".join(_redact(u) for u in self.urls)
        options: dict[str, Any] = {"request_timeout": request_timeout}
        if username is not None or password is not None:
            options["basic_auth"] = (username or "", password or "")
        if api_key is not None:
            options["api_key"] = api_key
        if ca_certs is not None:
            options["ca_certs"] = ca_certs
        if not verify_certs:
            options["verify_certs"] = False
            options["ssl_show_warn"] = False
        self._client = Elasticsearch(list(self.urls), **options)
        self._lock = threading.Lock()
        self._template_installed = False
        self._closed = False

    # -- documents -----------------------------------------------------------------
    def index_for(self, slot: datetime) -> str:
        """The index that holds the run of ``slot`` (from the slot, in UTC)."""
        return index_name(self.index_prefix, self.index_period, slot)

    def document(self, report: RunReport) -> dict[str, Any]:
        """The document stored for ``report``: its JSON plus ``slot_us``, with every
        string valid Unicode and stdout, stderr and reason bounded."""
        doc: dict[str, Any] = _valid(report.to_json())
        truncated = bool(doc.get("output_truncated"))
        for name in BOUNDED_FIELDS:
            if doc.get(name):
                doc[name], cut = bound_text(doc[name], self.max_output_bytes)
                truncated = truncated or cut
        doc["output_truncated"] = truncated
        doc["slot_us"] = to_us(report.slot)
        return doc

    def template(self) -> dict[str, Any]:
        """The body of the index template this store installs."""
        return {
            "index_patterns": [f"{self.index_prefix}*"],
            "priority": TEMPLATE_PRIORITY,
            "template": {"settings": {"index": SETTINGS}, "mappings": MAPPING},
            "_meta": {"description": "distcrond run reports", "managed_by": "distcrond"},
        }

    # -- helpers -------------------------------------------------------------------
    def _unavailable(self, what: str, error: Exception) -> StoreUnavailable:
        if isinstance(error, ApiError):
            detail = f"HTTP {error.meta.status}: {error}"
        else:
            detail = f"{type(error).__name__}: {error}"
        return StoreUnavailable(f"Elasticsearch ({self._where}) {what}: {detail}")

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable("the Elasticsearch report store is closed")

    def _ensure_template(self) -> None:
        with self._lock:
            if self._template_installed:
                return
            body = self.template()
            try:
                self._client.indices.put_index_template(
                    name=self.template_name,
                    index_patterns=body["index_patterns"],
                    priority=body["priority"],
                    template=body["template"],
                    meta=body["_meta"],
                )
            except (ApiError, TransportError) as e:
                raise self._unavailable(
                    f"cannot install the index template {self.template_name}", e
                ) from e
            self._add_new_fields()
            self._template_installed = True

    def _add_new_fields(self) -> None:
        """Add the fields added since the first release to the indices an older version
        made (strict mappings would refuse every report that has them); a no-op where
        they are there. An index that cannot take them (made by hand, another type) is
        logged: its reports that have them are then refused for good, and kept."""
        try:
            self._client.indices.put_mapping(
                index=f"{self.index_prefix}*",
                properties={name: MAPPING["properties"][name] for name in ADDED_FIELDS},
                allow_no_indices=True,
                expand_wildcards="open",
            )
        except ApiError as e:
            log.warning("cannot add %s to the indices %s*: %s", ADDED_FIELDS, self.index_prefix, e)
        except TransportError as e:
            raise self._unavailable("cannot update the indices' mappings", e) from e

    # -- ReportStore -----------------------------------------------------------------
    def write(self, reports: Sequence[RunReport]) -> None:
        """Index the reports (``_id`` = run id) in one bulk request (more when they
        exceed 32 MB of documents). See the module docstring for the errors."""
        if not reports:
            return
        self._check_open()
        batches: list[tuple[list[dict[str, Any]], list[str]]] = []
        operations: list[dict[str, Any]] = []
        run_ids: list[str] = []
        size = 0
        for report in reports:
            doc = self.document(report)
            doc_size = sum(len(doc[f].encode()) for f in BOUNDED_FIELDS if doc.get(f)) + 4096
            if operations and size + doc_size > MAX_REQUEST_BYTES:
                batches.append((operations, run_ids))
                operations, run_ids, size = [], [], 0
            operations += [{"index": {"_index": self.index_for(report.slot), "_id": doc["run_id"]}}]
            operations += [doc]
            run_ids.append(doc["run_id"])
            size += doc_size
        batches.append((operations, run_ids))

        self._ensure_template()
        retry: dict[str, str] = {}
        rejected: dict[str, str] = {}
        for operations, run_ids in batches:
            try:
                response = self._client.bulk(
                    operations=operations,
                    refresh=self.refresh,
                    filter_path="errors,items.*.status,items.*.error",
                )
            except (ApiError, TransportError) as e:
                raise self._unavailable("bulk write failed", e) from e
            body = response.body or {}
            if not body.get("errors"):
                continue
            for run_id, item in zip(run_ids, body.get("items", []), strict=False):
                result: dict[str, Any] = next(iter(item.values()), {})
                status = int(result.get("status", 0))
                if status == 429 or status >= 500:
                    retry[run_id] = f"HTTP {status} {_reason(result.get('error'))}"
                elif status >= 300:
                    rejected[run_id] = _reason(result.get("error"))
        if retry:
            sample = "; ".join(f"{k}: {v}" for k, v in list(retry.items())[:3])
            raise StoreUnavailable(
                f"Elasticsearch ({self._where}) asked to retry {len(retry)} report(s): {sample}"
                + (f" ({len(rejected)} more refused)" if rejected else "")
            )
        if rejected:
            raise ReportRejected(rejected)

    def get(self, run_id: str) -> RunReport | None:
        """The report of ``run_id`` (None when there is none, or the id is not a run id)."""
        self._check_open()
        try:
            _, slot, _ = split_run_id(run_id)
        except ValueError:
            return None
        try:
            response = self._client.get(index=self.index_for(slot), id=valid_unicode(run_id))
        except ApiError as e:
            if e.meta.status == 404:
                return None
            raise self._unavailable(f"get {run_id!r} failed", e) from e
        except TransportError as e:
            raise self._unavailable(f"get {run_id!r} failed", e) from e
        return self._report(response.body["_source"])

    @staticmethod
    def _report(source: dict[str, Any]) -> RunReport:
        source = dict(source)
        source.pop("slot_us", None)
        return RunReport.from_json(source)

    def list_runs(self, query: RunQuery) -> RunPage:
        """Matching reports, newest slot first (ties: run id descending).

        ``limit`` is clamped to 1..1000; ``cursor`` is the previous page's
        ``next_cursor`` (ValueError("invalid cursor") when malformed).
        """
        limit = min(max(int(query.limit), 1), MAX_LIMIT)
        search_after = list(decode_cursor(query.cursor)) if query.cursor is not None else None
        self._check_open()
        filters: list[dict[str, Any]] = []
        if query.job_id is not None:
            filters.append({"term": {"job_id": query.job_id}})
        if query.states:
            filters.append({"terms": {"state": [RunState(s).value for s in query.states]}})
        if query.node_id is not None:
            filters.append({"term": {"node_id": query.node_id}})
        slot_range: dict[str, int] = {}
        if query.since is not None:
            slot_range["gte"] = to_us(query.since)
        if query.until is not None:
            slot_range["lt"] = to_us(query.until)
        if slot_range:
            filters.append({"range": {"slot_us": slot_range}})
        if query.text and query.text.strip():
            filters.append(
                {
                    "multi_match": {
                        "query": query.text,
                        "fields": ["stdout", "stderr"],
                        "type": "cross_fields",
                        "operator": "and",
                    }
                }
            )
        try:
            response = self._client.search(
                index=f"{self.index_prefix}*",
                query={"bool": {"filter": filters}},
                sort=[
                    {"slot_us": {"order": "desc", "unmapped_type": "long"}},
                    {"run_id": {"order": "desc", "unmapped_type": "keyword"}},
                ],
                search_after=search_after,
                size=limit + 1,  # one more tells whether there is a next page
                track_total_hits=False,
                ignore_unavailable=True,
                allow_no_indices=True,
            )
        except (ApiError, TransportError) as e:
            raise self._unavailable("search failed", e) from e
        hits = response.body.get("hits", {}).get("hits", [])
        page = hits[:limit]
        next_cursor = None
        if len(hits) > limit:
            slot_us, run_id = page[-1]["sort"]
            next_cursor = encode_cursor(int(slot_us), str(run_id))
        return RunPage(runs=[self._report(h["_source"]) for h in page], next_cursor=next_cursor)

    def status(self) -> StoreStatus:
        """ok when the cluster answers and is not red; detail names the URL(s)."""
        if self._closed:
            return StoreStatus(ok=False, backend=self.backend, detail=f"{self._where}: closed")
        try:
            health = self._client.options(
                request_timeout=STATUS_TIMEOUT, max_retries=0
            ).cluster.health(timeout=f"{int(STATUS_TIMEOUT)}s")
        except ApiError as e:
            if e.meta.status == 403:  # it answers; these credentials may not read its health
                return StoreStatus(
                    ok=True,
                    backend=self.backend,
                    detail=f"{self._where}: answers (cluster health not permitted)",
                )
            return StoreStatus(
                ok=False, backend=self.backend, detail=f"{self._where}: HTTP {e.meta.status} {e}"
            )
        except TransportError as e:
            return StoreStatus(
                ok=False, backend=self.backend, detail=f"{self._where}: {type(e).__name__}: {e}"
            )
        color = str(health.body.get("status", "unknown"))
        name = health.body.get("cluster_name", "?")
        return StoreStatus(
            ok=color in ("green", "yellow"),
            backend=self.backend,
            detail=f"{self._where}: cluster {name} {color}",
        )

    def close(self) -> None:
        """Close the client's connections (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._client.close()
