"""Live reload of the jobs and nodes directories (and of the API tokens file, if any:
its directory is watched like theirs).

A :class:`ConfigWatcher` reloads its registry shortly after any change in
either directory (file created, written, deleted or renamed, including the
write-a-temp-file-then-rename that editors and sync tools do) and tells its
listener when the loaded config or its errors changed. Events are debounced:
a burst of them makes one reload, ``debounce`` seconds after the last one
(``5 * debounce`` after the first at most, so a steady stream of writes
cannot postpone reloads for ever).

A directory that does not exist (yet) is polled for every ``dir_poll``
seconds and watched from when it appears; one that is deleted or replaced (a
new directory at the same path, a swapped symlink) is watched anew. Polling
the directory itself, rather than watching its parent, works the same
whatever the parent is (which may not exist either, or be unwatchable).

As a safety net for lost events (inotify does not see changes made by other
hosts on NFS), the watcher also reloads everything every ``full_reload_every``
seconds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch

from distcrond.config.loader import ConfigError, ConfigRegistry, LoadedConfig
from distcrond.config.tokens import TokenTable

log = logging.getLogger("distcrond.config")

# Changes only: the watcher's own reads would otherwise be "opened"/"closed
# without write" events that trigger another reload, for ever.
_CHANGE_EVENTS = (
    FileCreatedEvent,
    FileModifiedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileClosedEvent,
    DirCreatedEvent,
    DirModifiedEvent,
    DirDeletedEvent,
    DirMovedEvent,
)
_CHANGE_TYPES = frozenset({"created", "modified", "deleted", "moved", "closed"})


class _Handler(FileSystemEventHandler):
    def __init__(self, notify: Callable[[], None]) -> None:
        self._notify = notify

    def on_any_event(self, event: FileSystemEvent) -> None:
        # Any name counts, hidden ones too: a Kubernetes ConfigMap update only
        # swaps the hidden "..data" symlink that the visible files point through.
        if event.event_type in _CHANGE_TYPES:
            self._notify()


@dataclass
class _Watch:
    watch: ObservedWatch
    identity: tuple[int, int]  # (st_dev, st_ino) of the directory watched


class ConfigWatcher:
    """Reloads ``registry`` on changes to its directories; calls ``on_change`` when it differs.

    With ``use_events=False`` (for file systems where inotify sees nothing,
    like NFS) it relies on the full reload every ``full_reload_every`` seconds.

    ``on_change(config)`` is called from the watcher's thread, only when the
    digest, the errors or the API tokens changed since the last config it was given (or the
    registry's config at ``start()``). ``start()`` and ``stop()`` may each be
    called once; ``stop()`` joins the watcher's threads.
    """

    def __init__(
        self,
        registry: ConfigRegistry,
        on_change: Callable[[LoadedConfig], None],
        debounce: float = 0.1,
        full_reload_every: float | None = 30.0,
        dir_poll: float = 0.25,
        use_events: bool = True,
    ) -> None:
        if debounce < 0:
            raise ValueError("debounce must not be negative")
        if full_reload_every is not None and full_reload_every <= 0:
            raise ValueError("full_reload_every must be positive (or None to disable it)")
        if not use_events and full_reload_every is None:
            raise ValueError("without events, full_reload_every is the only way to see changes")
        if dir_poll <= 0:
            raise ValueError("dir_poll must be positive")
        self.registry = registry
        self.on_change = on_change
        self.debounce = debounce
        self.full_reload_every = full_reload_every
        self.dir_poll = dir_poll
        self.use_events = use_events
        tokens_dir = (registry.tokens_file.parent,) if registry.tokens_file else ()
        self._dirs = (registry.jobs_dir, registry.nodes_dir, *tokens_dir)
        self._event = threading.Event()
        self._stop = threading.Event()
        self._observer: BaseObserver | None = None
        self._thread: threading.Thread | None = None
        self._watches: dict[Path, _Watch] = {}
        self._handler = _Handler(self._event.set)
        self._reported: tuple[str, tuple[ConfigError, ...], TokenTable | None] = ("", (), None)
        self._started = False

    def start(self) -> None:
        """Start watching. Reloads once right away, to catch changes made before the start."""
        if self._started:
            raise RuntimeError("ConfigWatcher.start() called twice")
        self._started = True
        current = self.registry.current
        self._reported = (current.digest, current.errors, current.tokens)
        self._observer = Observer()
        self._observer.daemon = True
        self._observer.start()
        self._sync_watches()
        self._event.set()
        self._thread = threading.Thread(target=self._run, name="config-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching and join the threads; safe to call more than once, or before start()."""
        self._stop.set()
        self._event.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._observer is not None:
            self._observer.stop()
            self._observer.join()
            self._observer = None
        self._watches.clear()

    # -- the watcher's thread ------------------------------------------------------

    def _run(self) -> None:
        next_full = self._next_full()
        while not self._stop.is_set():
            timeout = self.dir_poll
            if next_full is not None:
                timeout = min(timeout, max(0.0, next_full - time.monotonic()))
            changed = self._event.wait(timeout)
            if self._stop.is_set():
                return
            self._sync_watches()
            if changed:
                self._settle()
                if self._stop.is_set():
                    return
            elif next_full is None or time.monotonic() < next_full:
                continue
            self._reload()
            next_full = self._next_full()

    def _next_full(self) -> float | None:
        if self.full_reload_every is None:
            return None
        return time.monotonic() + self.full_reload_every

    def _settle(self) -> None:
        """Wait until no event came for ``debounce`` seconds (at most 5 * debounce)."""
        deadline = time.monotonic() + 5 * self.debounce
        while not self._stop.is_set():
            self._event.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._event.wait(min(self.debounce, remaining)):
                return

    def _reload(self) -> None:
        try:
            config = self.registry.reload()
        except Exception:  # the registry promises not to raise; keep watching if it does
            log.exception("config reload failed")
            return
        state = (config.digest, config.errors, config.tokens)
        if state == self._reported:
            return
        self._reported = state
        try:
            self.on_change(config)
        except Exception:
            log.exception("config change listener failed")

    def _sync_watches(self) -> None:
        """Watch the directories that exist, anew when one was replaced; forget those gone."""
        observer = self._observer
        if observer is None or not self.use_events:
            return
        for directory in self._dirs:
            try:
                st = os.stat(directory)
                identity: tuple[int, int] | None = (st.st_dev, st.st_ino)
            except OSError:
                identity = None
            watched = self._watches.get(directory)
            if watched is not None and watched.identity == identity:
                continue
            if watched is not None:
                self._unschedule(observer, watched.watch)
                del self._watches[directory]
                self._event.set()  # its contents are gone or different: reload
            if identity is None:
                continue
            try:
                watch = observer.schedule(
                    self._handler,
                    str(directory),
                    recursive=False,
                    event_filter=list(_CHANGE_EVENTS),
                )
            except OSError as e:  # e.g. out of inotify watches: the full reload still works
                log.warning("cannot watch %s (retrying): %s", directory, e)
                continue
            self._watches[directory] = _Watch(watch, identity)
            log.debug("watching %s", directory)
            self._event.set()  # files may have appeared while it was not watched

    @staticmethod
    def _unschedule(observer: BaseObserver, watch: ObservedWatch) -> None:
        # The emitter may have stopped already, when its directory went away.
        with contextlib.suppress(KeyError, OSError):
            observer.unschedule(watch)
