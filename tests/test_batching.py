"""The call combiner: concurrent callers share batches, each gets its own answer."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest

from distcrond.batching import Combiner

pytestmark = pytest.mark.timeout(30)


class Store:
    """A batch function that is slow enough for callers to pile up, and checks overlap."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.batches: list[list[str]] = []
        self.running = 0
        self.overlapped = False
        self.fail_on = fail_on
        self._lock = threading.Lock()
        self.first_started = threading.Event()
        self.release_first = threading.Event()

    def __call__(self, items: Sequence[tuple[str, int]]) -> dict[str, int]:
        with self._lock:
            self.running += 1
            self.overlapped |= self.running > 1
            first = not self.batches
            self.batches.append([k for k, _ in items])
        if first:  # hold the first batch until every other caller is waiting
            self.first_started.set()
            assert self.release_first.wait(10)
        with self._lock:
            self.running -= 1
        if self.fail_on is not None and any(k == self.fail_on for k, _ in items):
            raise RuntimeError(f"store refused the batch with {self.fail_on}")
        return {k: v * 10 for k, v in items}


def submit_all(combiner: Combiner[str, int, int], store: Store, n: int) -> dict[str, object]:
    results: dict[str, object] = {}
    lock = threading.Lock()

    def call(i: int) -> None:
        try:
            value: object = combiner.submit(f"k{i}", i)
        except RuntimeError as e:
            value = e
        with lock:
            results[f"k{i}"] = value

    first = threading.Thread(target=call, args=(0,))
    first.start()
    assert store.first_started.wait(10)
    others = [threading.Thread(target=call, args=(i,)) for i in range(1, n)]
    for t in others:
        t.start()

    def all_waiting() -> bool:
        with combiner._lock:  # every other caller has queued its item
            return len(combiner._pending) == n - 1

    deadline = threading.Event()
    for _ in range(1000):
        if all_waiting():
            break
        deadline.wait(0.01)  # polling a condition with a deadline
    store.release_first.set()
    for t in [first, *others]:
        t.join(10)
    return results


def test_waiting_callers_go_in_one_batch_and_each_gets_its_answer() -> None:
    store = Store()
    combiner: Combiner[str, int, int] = Combiner(store)

    results = submit_all(combiner, store, 50)

    assert results == {f"k{i}": i * 10 for i in range(50)}
    assert store.batches[0] == ["k0"]
    assert sorted(store.batches[1]) == sorted(f"k{i}" for i in range(1, 50))
    assert len(store.batches) == 2 and not store.overlapped


def test_batches_are_bounded_and_never_run_at_once() -> None:
    store = Store()
    combiner: Combiner[str, int, int] = Combiner(store, max_batch=7)

    results = submit_all(combiner, store, 30)

    assert results == {f"k{i}": i * 10 for i in range(30)}
    assert all(len(b) <= 7 for b in store.batches)
    assert sorted(k for b in store.batches for k in b) == sorted(f"k{i}" for i in range(30))
    assert not store.overlapped


def test_an_error_goes_to_every_caller_of_its_batch_only() -> None:
    store = Store(fail_on="k3")
    combiner: Combiner[str, int, int] = Combiner(store)

    results = submit_all(combiner, store, 10)

    assert results["k0"] == 0  # its batch (alone) succeeded
    failed = [k for k, v in results.items() if isinstance(v, RuntimeError)]
    assert sorted(failed) == sorted(f"k{i}" for i in range(1, 10))


def test_a_caller_alone_runs_its_batch_at_once() -> None:
    calls: list[list[str]] = []

    def run_batch(items: Sequence[tuple[str, None]]) -> dict[str, bool]:
        calls.append([k for k, _ in items])
        return {k: True for k, _ in items}

    combiner: Combiner[str, None, bool] = Combiner(run_batch)
    assert combiner.submit("a", None) is True
    assert combiner.submit("b", None) is True
    assert calls == [["a"], ["b"]]


def test_items_submitted_while_the_leader_waits_before_its_batch_join_that_batch() -> None:
    batches: list[list[str]] = []
    entered, go = threading.Event(), threading.Event()

    def before() -> None:  # e.g. "let the starts go first"
        entered.set()
        assert go.wait(10)

    def run(items: Sequence[tuple[str, int]]) -> dict[str, int]:
        batches.append([k for k, _ in items])
        return {k: v for k, v in items}

    combiner: Combiner[str, int, int] = Combiner(run, before_batch=before)
    results: dict[str, int | None] = {}
    callers = [
        threading.Thread(target=lambda k=k: results.update({k: combiner.submit(k, 1)}))
        for k in ("a", "b", "c")
    ]
    callers[0].start()
    assert entered.wait(10)
    for t in callers[1:]:
        t.start()
    for _ in range(1000):  # polling a condition with a deadline
        with combiner._lock:
            if len(combiner._pending) == 3:
                break
        threading.Event().wait(0.01)
    go.set()
    for t in callers:
        t.join(10)
    assert batches == [["a", "b", "c"]]
    assert results == {"a": 1, "b": 1, "c": 1}
