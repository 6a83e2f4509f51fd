"""The daemon's own pieces that run in-process (the whole daemon runs in integration/)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from distcrond.daemon import freeze_heap


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


@pytest.fixture
def thawed() -> Iterator[None]:
    """The collector as other tests expect it: nothing frozen, before and after."""
    gc.unfreeze()
    yield
    gc.unfreeze()


def _tracked(obj: object) -> bool:
    return any(o is obj for o in gc.get_objects())


def test_freeze_heap_takes_the_objects_alive_out_of_full_collections(thawed: None) -> None:
    alive = [_Node()]  # a container the collector tracks
    assert _tracked(alive)
    # (other threads of the test process may free frozen objects meanwhile)
    assert freeze_heap() > 10_000  # this process's modules and classes, at least
    assert not _tracked(alive)  # a full collection no longer walks it


def test_after_freeze_heap_new_reference_cycles_are_still_collected(thawed: None) -> None:
    freeze_heap()
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    gc.collect()
    assert gone() is None


def test_freeze_heap_collects_the_garbage_first_rather_than_freezing_it(thawed: None) -> None:
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    freeze_heap()
    assert gone() is None
