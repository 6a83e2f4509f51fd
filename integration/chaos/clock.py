"""A peer's wall clock under Debian's libfaketime, moved by writing its offset file.

The peer chosen for ``clock-step`` is started with ``LD_PRELOAD`` of libfaketime and
``FAKETIME_TIMESTAMP_FILE`` pointing at :attr:`FakeClock.path`, re-read at most once a
second (``FAKETIME_CACHE_DURATION=1``: with ``FAKETIME_NO_CACHE=1`` every clock call
reads the file, and the peer burnt 60 % of a core doing that, starving the machine);
its monotonic clock stays real
(``FAKETIME_DONT_FAKE_MONOTONIC=1``), and rate changes do not jump
(``FAKETIME_XRESET=1``). ``date`` is exempt (``FAKETIME_SKIP_CMDS``), so the
ledger lines its jobs write carry the real time.

Debian's libfaketime 0.9.10 breaks ``clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME)``
when the monotonic clock is not faked (EINVAL: Python's ``time.sleep`` raises, and
distcrond cannot start), so ``sleepshim.c`` beside this file is compiled (gcc) into
the work directory and preloaded first: its ``clock_nanosleep`` is the real call.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

SHIM_SOURCE = Path(__file__).with_name("sleepshim.c")
LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
CACHE_S = 1  # how long libfaketime keeps an offset before reading the file again


class FakeClock:
    """The offset file of one peer's faked clock; ``"+0"`` (the real time) to begin with."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.shim = path.with_name("sleepshim.so")
        self.set("+0")

    def prepare(self) -> None:
        """Check libfaketime and build the sleep shim; RuntimeError says what is missing."""
        if not LIBFAKETIME.exists():
            raise RuntimeError(f"{LIBFAKETIME} is missing: apt-get install libfaketime")
        gcc = shutil.which("gcc") or shutil.which("cc")
        if gcc is None:
            raise RuntimeError("no C compiler for sleepshim.c: apt-get install gcc")
        cmd = [gcc, "-O2", "-shared", "-fPIC", "-o", str(self.shim), str(SHIM_SOURCE)]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"building {SHIM_SOURCE.name} failed: {result.stderr}")

    def set(self, spec: str) -> None:
        """Write a libfaketime spec: ``+30`` (seconds ahead), ``-30``, ``+0 x1.2`` (a rate)."""
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(spec + "\n")
        tmp.rename(self.path)

    def reset(self) -> None:
        """Back to the real time at the real rate: ``+0`` alone keeps a rate set before
        (and with ``FAKETIME_XRESET`` its accumulated offset), ``+0 x1`` then ``+0`` does not."""
        self.set("+0 x1")
        time.sleep(CACHE_S + 0.2)  # the peer reads it once its cache expires
        self.set("+0")

    def environment(self) -> dict[str, str]:
        """The variables a process needs to run on this clock."""
        return {
            "LD_PRELOAD": f"{self.shim}:{LIBFAKETIME}",
            "FAKETIME_TIMESTAMP_FILE": str(self.path),
            "FAKETIME_CACHE_DURATION": str(CACHE_S),
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
            "FAKETIME_XRESET": "1",
            "FAKETIME_SKIP_CMDS": "date",
        }
