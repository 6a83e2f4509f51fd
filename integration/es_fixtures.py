"""Pytest fixtures for a real single-node Elasticsearch on loopback.

``es_server`` (session) starts its own :class:`~deploy.services.elasticsearch.Elasticsearch`
on 127.0.0.1:9250 (transport 9350; override the HTTP port with
``DISTCRON_TEST_ES_PORT``). The distribution (Maven Central's integ-test-zip,
fetched with ``mvn``) is cached in ``var/services/elasticsearch/dist/`` (override
with ``DISTCRON_ES_DIST_DIR``), so only the first session ever downloads; the
node's config copy, data and logs live in a fresh ``/tmp/distcron-es-test-*``
directory, removed at the end of the session. (Not under pytest's tmp_path:
that is ``/tmp/pytest-of-root/`` with mode 0700, which the unprivileged
``distcron-es`` user the server runs as could not enter.) It never adopts a node
it did not start: if a port is taken the session fails at once and says why.
Set ``DISTCRON_TEST_ES_KEEP=1`` to keep the node directory (logs) after the session.

``es_url`` (function) deletes every ``distcron-test-*`` index (left by an earlier
test) and returns the base URL, ``http://127.0.0.1:9250``. Tests must name their
indices ``distcron-test-…``; ``es_index_prefix`` gives a unique such prefix
(``distcron-test-<hex>-``) for tests that want isolation by name as well.

Load the module as a plugin (``-p integration.es_fixtures``) or import them::

    from integration.es_fixtures import es_index_prefix, es_server, es_url  # noqa: F401
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.services.common import port_is_free
from deploy.services.elasticsearch import (
    DEFAULT_DIST_DIR,
    TRANSPORT_OFFSET,
    Elasticsearch,
    ElasticsearchError,
    http_json,
)

PORT_ENV = "DISTCRON_TEST_ES_PORT"
KEEP_ENV = "DISTCRON_TEST_ES_KEEP"
PORT = int(os.environ.get(PORT_ENV, "9250"))
START_TIMEOUT = 120.0
INDEX_PATTERN = "distcron-test-*"


def delete_test_indices(url: str) -> None:
    """Delete every ``distcron-test-*`` index (hidden ones too)."""
    status, body = http_json(f"{url}/{INDEX_PATTERN}?expand_wildcards=all", method="DELETE")
    if status != 200:
        raise AssertionError(f"DELETE /{INDEX_PATTERN} answered {status}: {body}")


@pytest.fixture(scope="session")
def es_server() -> Iterator[Elasticsearch]:
    """A running single-node Elasticsearch for the whole test session; stopped at its end."""
    taken = [p for p in (PORT, PORT + TRANSPORT_OFFSET) if not port_is_free(p)]
    if taken:
        pytest.fail(
            f"Elasticsearch test node: 127.0.0.1 port(s) {taken} already in use (HTTP {PORT}, "
            f"transport {PORT + TRANSPORT_OFFSET}). The tests start their own node; stop "
            f"whatever listens there (`python deploy/services/elasticsearch.py stop` for a dev "
            f"node) or set {PORT_ENV} to another port.",
            pytrace=False,
        )
    root = Path(tempfile.mkdtemp(prefix="distcron-es-test-"))
    node = Elasticsearch(root, port=PORT, dist_dir=DEFAULT_DIST_DIR)
    try:
        node.start(timeout=START_TIMEOUT)
    except ElasticsearchError as e:
        node.stop()
        pytest.fail(f"Elasticsearch test node did not start (dir {root}): {e}", pytrace=False)
    try:
        yield node
    finally:
        node.stop()
        if not os.environ.get(KEEP_ENV):
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def es_url(es_server: Elasticsearch) -> str:
    """The node's base URL, with no ``distcron-test-*`` index left from earlier tests."""
    if not es_server.running():
        pytest.fail(f"Elasticsearch test node is gone\n{es_server.log_tail()}", pytrace=False)
    delete_test_indices(es_server.url)
    return es_server.url


@pytest.fixture
def es_index_prefix(es_url: str) -> str:
    """A prefix unique to this test, ``distcron-test-<hex>-`` (still matched by cleanup)."""
    return f"distcron-test-{uuid.uuid4().hex[:12]}-"
