"""Group commit for calls: concurrent callers' items go to the store in one batch.

When two hundred runs end at once, each run's thread records its report: two
hundred write transactions that queue behind each other (SQLite has one writer;
Elasticsearch prefers one bulk). :class:`Combiner` lets the callers that arrive while a
batch is being written wait, then sends all of them as the next batch, in one
call of ``run_batch``. A caller alone (the usual case) runs its own batch of one
at once: combining adds no delay, it only forms batches under contention.

The caller whose item starts a batch runs that batch and returns when it is done;
it does not stay to run the next one (that would delay its own run): one of the
waiting callers does.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
P = TypeVar("P")
V = TypeVar("V")


@dataclass
class _Item(Generic[K, P, V]):
    key: K
    payload: P
    done: bool = False
    lead: bool = False  # its caller is to run the next batch
    result: V | None = None
    error: BaseException | None = None
    wake: threading.Event = field(default_factory=threading.Event)


class Combiner(Generic[K, P, V]):
    """``submit(key, payload)`` returns ``run_batch(items)[key]`` (None when the key is
    missing), or raises what ``run_batch`` raised for the batch that held the item.

    ``run_batch`` receives (key, payload) pairs with distinct keys (a key submitted
    again while pending replaces the payload; both callers get its result), at most
    ``max_batch`` of them, in the order they were submitted.

    Each waiting caller sleeps on an event of its own and is woken once: when its
    item is done, or when it is its turn to run the next batch (no wake-up of every
    waiter at each batch, which costs more than the batching saves with 200 of them).
    """

    def __init__(
        self,
        run_batch: Callable[[Sequence[tuple[K, P]]], dict[K, V]],
        max_batch: int = 500,
        before_batch: Callable[[], None] | None = None,
    ) -> None:
        self._run_batch = run_batch
        # Called by the caller who runs the next batch before it takes the pending items:
        # a wait there (for more urgent work to go first) makes that batch larger.
        self._before_batch = before_batch
        self._max_batch = max_batch
        self._lock = threading.Lock()
        self._pending: dict[K, _Item[K, P, V]] = {}
        self._busy = False

    def submit(self, key: K, payload: P) -> V | None:
        with self._lock:
            item = self._pending.get(key)
            if item is None:
                item = self._pending[key] = _Item(key, payload)
            else:
                item.payload = payload
            lead = not self._busy
            self._busy = True
        while not lead:
            item.wake.wait()
            with self._lock:
                if item.done:
                    break
                item.wake.clear()
                if item.lead:
                    item.lead = False
                    if not self._busy:  # else a newcomer took the turn: wait for it
                        lead = self._busy = True
        if lead:
            # The leader's item is the oldest pending one: it is in the batch it runs.
            if self._before_batch is not None:
                self._before_batch()
            with self._lock:
                keys = list(self._pending)[: self._max_batch]
                batch = [self._pending.pop(k) for k in keys]
            self._run(batch)
        if item.error is not None:
            raise item.error
        return item.result

    def _run(self, batch: list[_Item[K, P, V]]) -> None:
        results: dict[K, V] = {}
        error: BaseException | None = None
        try:
            results = self._run_batch([(item.key, item.payload) for item in batch])
        except BaseException as e:  # handed to every caller of the batch
            error = e
        with self._lock:
            for item in batch:
                item.done = True
                item.result = results.get(item.key)
                item.error = error
                item.wake.set()
            self._busy = False
            if self._pending:  # the oldest waiter runs the next batch
                nxt = next(iter(self._pending.values()))
                nxt.lead = True
                nxt.wake.set()
