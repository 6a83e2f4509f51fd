"""What every unit test shares: the root logger as it was before the test.

``distcrond.cli.main`` (and a test of the log format) configure logging for the
process: a handler on the stream that was stderr then, which for a test is
pytest's capture, closed after it. Without this, a later test's log line would
print "--- Logging error ---" into that test's own captured stderr.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _root_logger_restored() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)
