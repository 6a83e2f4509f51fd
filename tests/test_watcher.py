"""Live reload: changes to the directories reach the listener within a second, bad ones too."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from distcrond.config.loader import ConfigRegistry, LoadedConfig
from distcrond.config.watcher import ConfigWatcher

pytestmark = pytest.mark.timeout(30)

JOB: dict[str, Any] = {"schedule": {"interval": "10m", "reference": "03:10"}, "command": ["true"]}
NODE: dict[str, Any] = {"roles": ["web"]}
DEADLINE = 5.0


class Listener:
    """Records the configs it is given; tests wait on a condition of them."""

    def __init__(self) -> None:
        self.configs: list[LoadedConfig] = []
        self._cond = threading.Condition()

    def __call__(self, config: LoadedConfig) -> None:
        with self._cond:
            self.configs.append(config)
            self._cond.notify_all()

    @property
    def last(self) -> LoadedConfig:
        with self._cond:
            return self.configs[-1]

    def wait_for(self, predicate: Callable[[LoadedConfig], bool]) -> LoadedConfig:
        """The last config reported, once it satisfies ``predicate`` (a final state)."""
        deadline = time.monotonic() + DEADLINE
        with self._cond:
            while True:
                if self.configs and predicate(self.configs[-1]):
                    return self.configs[-1]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no matching config within {DEADLINE}s: {self.configs}")
                self._cond.wait(min(remaining, 0.05))


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + DEADLINE
    event = threading.Event()
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        event.wait(0.02)  # a short poll interval, not a synchronisation by sleeping


def write(path: Path, data: Any) -> None:
    path.write_text(data if isinstance(data, str) else json.dumps(data))


def write_atomically(path: Path, data: Any) -> None:
    """What editors and config sync tools do: write a temp file, then rename it over."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp, data)
    os.replace(tmp, path)


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    jobs, nodes = tmp_path / "jobs.d", tmp_path / "nodes.d"
    jobs.mkdir()
    nodes.mkdir()
    return jobs, nodes


@pytest.fixture
def registry(dirs: tuple[Path, Path]) -> ConfigRegistry:
    registry = ConfigRegistry(*dirs)
    registry.reload()
    return registry


@pytest.fixture
def listener() -> Listener:
    return Listener()


@pytest.fixture
def watcher(registry: ConfigRegistry, listener: Listener) -> Iterator[ConfigWatcher]:
    watcher = ConfigWatcher(registry, listener, debounce=0.05)
    watcher.start()
    yield watcher
    watcher.stop()


def has_job(job_id: str) -> Callable[[LoadedConfig], bool]:
    return lambda config: job_id in config.jobs


@pytest.mark.usefixtures("watcher")
def test_new_job_file_is_loaded_within_a_second(
    dirs: tuple[Path, Path], listener: Listener
) -> None:
    started = time.monotonic()
    write(dirs[0] / "job1.json", JOB)
    listener.wait_for(has_job("job1"))
    assert time.monotonic() - started < 1.0


@pytest.mark.usefixtures("watcher")
def test_new_node_file_is_loaded(dirs: tuple[Path, Path], listener: Listener) -> None:
    write(dirs[1] / "web-1.json", NODE)
    assert listener.wait_for(lambda c: "web-1" in c.nodes).errors == ()


@pytest.mark.usefixtures("watcher")
def test_bad_edit_keeps_last_good_job_and_reports_the_error(
    dirs: tuple[Path, Path], listener: Listener
) -> None:
    write(dirs[0] / "job1.json", JOB)
    good = listener.wait_for(has_job("job1"))
    write(dirs[0] / "job1.json", {**JOB, "schedule": {"interval": "often"}})
    bad = listener.wait_for(lambda c: bool(c.errors))
    assert bad.jobs["job1"] == good.jobs["job1"]
    assert bad.digest == good.digest
    assert [(e.field, e.file) for e in bad.errors] == [
        ("schedule.interval", str(dirs[0] / "job1.json"))
    ]
    write(dirs[0] / "job1.json", {**JOB, "description": "fixed"})
    fixed = listener.wait_for(lambda c: not c.errors)
    assert fixed.jobs["job1"].description == "fixed"


@pytest.mark.usefixtures("watcher")
def test_removed_file_drops_its_job(dirs: tuple[Path, Path], listener: Listener) -> None:
    write(dirs[0] / "job1.json", JOB)
    write(dirs[0] / "job2.json", JOB)
    listener.wait_for(lambda c: {"job1", "job2"} <= set(c.jobs))
    (dirs[0] / "job1.json").unlink()
    assert set(listener.wait_for(lambda c: "job1" not in c.jobs).jobs) == {"job2"}


@pytest.mark.usefixtures("watcher")
def test_atomic_rename_over_the_file_is_picked_up(
    dirs: tuple[Path, Path], listener: Listener
) -> None:
    write_atomically(dirs[0] / "job1.json", JOB)
    listener.wait_for(has_job("job1"))
    write_atomically(dirs[0] / "job1.json", {**JOB, "description": "v2"})
    listener.wait_for(lambda c: "job1" in c.jobs and c.jobs["job1"].description == "v2")


@pytest.mark.usefixtures("watcher")
def test_file_moved_in_from_elsewhere_is_picked_up(
    dirs: tuple[Path, Path], tmp_path: Path, listener: Listener
) -> None:
    write(tmp_path / "staged.json", JOB)
    os.rename(tmp_path / "staged.json", dirs[0] / "job1.json")
    listener.wait_for(has_job("job1"))


@pytest.mark.usefixtures("watcher")
def test_unchanged_content_reloads_without_telling_the_listener(
    dirs: tuple[Path, Path], registry: ConfigRegistry, listener: Listener
) -> None:
    write(dirs[0] / "job1.json", JOB)
    listener.wait_for(has_job("job1"))
    reported = len(listener.configs)
    loaded_before = registry.current.loaded_at
    write(dirs[0] / "job1.json", JOB)
    write(dirs[0] / ".ignored.json", "{broken")
    wait_until(lambda: registry.current.loaded_at > loaded_before)
    assert len(listener.configs) == reported


def test_missing_directory_is_watched_once_it_appears(tmp_path: Path, listener: Listener) -> None:
    jobs, nodes = tmp_path / "jobs.d", tmp_path / "nodes.d"
    nodes.mkdir()
    registry = ConfigRegistry(jobs, nodes)
    registry.reload()
    watcher = ConfigWatcher(registry, listener, debounce=0.05, dir_poll=0.05)
    watcher.start()
    try:
        jobs.mkdir()
        listener.wait_for(lambda c: not c.errors)
        write(jobs / "job1.json", JOB)
        listener.wait_for(has_job("job1"))
    finally:
        watcher.stop()


@pytest.mark.usefixtures("watcher")
def test_replaced_directory_is_watched_anew(dirs: tuple[Path, Path], listener: Listener) -> None:
    jobs = dirs[0]
    write(jobs / "old.json", JOB)
    listener.wait_for(has_job("old"))
    jobs.rename(jobs.with_name("jobs.old"))
    jobs.mkdir()
    write(jobs / "new.json", JOB)
    listener.wait_for(lambda c: set(c.jobs) == {"new"})
    write(jobs / "newer.json", JOB)
    listener.wait_for(lambda c: set(c.jobs) == {"new", "newer"})


def test_full_reload_finds_changes_without_events(
    registry: ConfigRegistry, dirs: tuple[Path, Path], listener: Listener
) -> None:
    watcher = ConfigWatcher(registry, listener, full_reload_every=0.1, use_events=False)
    watcher.start()
    try:
        write(dirs[0] / "job1.json", JOB)
        listener.wait_for(has_job("job1"))
    finally:
        watcher.stop()


def test_change_made_before_start_is_reported(
    registry: ConfigRegistry, dirs: tuple[Path, Path], listener: Listener
) -> None:
    write(dirs[0] / "job1.json", JOB)  # after the registry's load, before the watcher
    watcher = ConfigWatcher(registry, listener, debounce=0.05, full_reload_every=None)
    watcher.start()
    try:
        listener.wait_for(has_job("job1"))
    finally:
        watcher.stop()


def test_failing_listener_does_not_stop_the_watcher(
    registry: ConfigRegistry, dirs: tuple[Path, Path], listener: Listener
) -> None:
    calls = []

    def flaky(config: LoadedConfig) -> None:
        calls.append(config)
        if len(calls) == 1:
            raise RuntimeError("listener bug")
        listener(config)

    watcher = ConfigWatcher(registry, flaky, debounce=0.05)
    watcher.start()
    try:
        write(dirs[0] / "job1.json", JOB)
        wait_until(lambda: len(calls) >= 1)
        write(dirs[0] / "job2.json", JOB)
        listener.wait_for(has_job("job2"))
    finally:
        watcher.stop()


def test_stop_joins_its_threads_and_may_be_repeated(registry: ConfigRegistry) -> None:
    before = set(threading.enumerate())
    watcher = ConfigWatcher(registry, lambda config: None, debounce=0.05)
    watcher.start()
    with pytest.raises(RuntimeError):
        watcher.start()
    watcher.stop()
    watcher.stop()
    assert {t for t in threading.enumerate() if t.is_alive()} <= before


def test_stop_before_start_is_harmless(registry: ConfigRegistry) -> None:
    ConfigWatcher(registry, lambda config: None).stop()
