"""The report store: where finished runs and their output are kept.

The embedded backend (``sqlite.py``) and the Elasticsearch backend both pass
``tests/contract/test_reports.py``. Promises:

* ``write`` is idempotent on ``run_id``: writing the same report again, or a
  newer version of it, leaves exactly one report with that id.
* ``list_runs`` is newest slot first, with keyset pagination: ``next_cursor``
  fetched with ``cursor`` continues exactly where the page ended, whatever
  was written in between.
* ``RunQuery.text`` finds runs whose stdout or stderr contains every word of it
  (case-insensitive). Elasticsearch analyzes the text into words; SQLite looks for
  each word as a substring, so it finds a little more (``back`` finds ``backup``).
* ``write`` raises :class:`~distcrond.coordination.base.StoreUnavailable` when
  the backend cannot be reached or asks to be retried later (nothing may have been
  stored: writing the batch again is safe), and :class:`ReportRejected` when it
  refuses some reports for good (the others were stored).
"""

from __future__ import annotations

import base64
import binascii
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from distcrond.coordination.base import StoreStatus
from distcrond.runs import RunReport, RunState


@dataclass(frozen=True)
class RunQuery:
    job_id: str | None = None
    states: tuple[RunState, ...] = ()
    node_id: str | None = None
    since: datetime | None = None  # slot >= since
    until: datetime | None = None  # slot < until
    limit: int = 50
    cursor: str | None = None
    text: str | None = None  # words that stdout or stderr contains, all of them


@dataclass(frozen=True)
class RunPage:
    runs: list[RunReport]
    next_cursor: str | None


def encode_cursor(slot_us: int, run_id: str) -> str:
    """The opaque ``next_cursor`` of a page that ended at the run ``(slot_us, run_id)``."""
    return base64.urlsafe_b64encode(f"{slot_us}|{run_id}".encode()).decode()


def decode_cursor(cursor: str) -> tuple[int, str]:
    """``(slot_us, run_id)`` of a cursor made by :func:`encode_cursor`.

    ValueError("invalid cursor") when it is not one.
    """
    try:
        text = base64.urlsafe_b64decode(cursor.encode("ascii")).decode()
        slot_text, sep, run_id = text.partition("|")
        slot_us = int(slot_text)
        if not sep or not run_id or not -(2**63) <= slot_us < 2**63:  # SQLite's integers
            raise ValueError(cursor)
        return slot_us, run_id
    except (ValueError, binascii.Error, UnicodeError):
        raise ValueError("invalid cursor") from None


class ReportRejected(Exception):
    """The backend refused some reports for good (retrying them cannot help).

    ``rejected`` maps each refused run id to the backend's reason; every other
    report of the batch was stored.
    """

    def __init__(self, rejected: dict[str, str]) -> None:
        self.rejected = dict(rejected)
        sample = "; ".join(f"{k}: {v}" for k, v in list(self.rejected.items())[:3])
        super().__init__(f"{len(self.rejected)} report(s) refused: {sample}")


class ReportStore(ABC):
    backend: str = "abstract"

    @abstractmethod
    def write(self, reports: Sequence[RunReport]) -> None:
        """Store reports (idempotent per run id); durable when it returns."""

    @abstractmethod
    def get(self, run_id: str) -> RunReport | None: ...

    @abstractmethod
    def list_runs(self, query: RunQuery) -> RunPage:
        """Reports matching the query, newest slot first (ties: run id descending)."""

    @abstractmethod
    def status(self) -> StoreStatus: ...

    @abstractmethod
    def close(self) -> None: ...
