"""Bounded output capture: keep the head and the tail of a stream, drop the middle.

A command may write gigabytes; a run report needs only its beginning (what it
was doing) and its end (the error). :class:`BoundedBuffer` is fed byte chunks
from any source — a pipe, an SSH channel — and never holds more than its limit
(plus the one chunk being fed).
"""

from __future__ import annotations

from collections import deque

# Longest UTF-8 sequence, and the largest number of continuation bytes it has.
_UTF8_MAX = 4
_UTF8_MAX_CONT = _UTF8_MAX - 1


def _is_continuation(byte: int) -> bool:
    return byte & 0xC0 == 0x80


def _sequence_length(lead: int) -> int:
    """Length of the UTF-8 sequence started by ``lead``; 0 when it cannot start one."""
    if lead < 0x80:
        return 1
    if lead & 0xE0 == 0xC0:
        return 2
    if lead & 0xF0 == 0xE0:
        return 3
    if lead & 0xF8 == 0xF0:
        return 4
    return 0


def _incomplete_suffix(data: bytes | bytearray) -> int:
    """How many bytes at the end of ``data`` form a UTF-8 sequence cut short (0-3)."""
    n = len(data)
    i = n - 1
    # Walk back over at most three continuation bytes to the sequence's lead byte.
    while i >= 0 and n - i <= _UTF8_MAX_CONT and _is_continuation(data[i]):
        i -= 1
    if i < 0:
        return 0
    need = _sequence_length(data[i])
    have = n - i
    return have if need > have else 0


def _dangling_prefix(data: bytes) -> int:
    """How many continuation bytes open ``data`` (the rest of a character cut off), at most 3."""
    i = 0
    while i < len(data) and i < _UTF8_MAX_CONT and _is_continuation(data[i]):
        i += 1
    return i


def omission_marker(omitted: int) -> str:
    """The line put between head and tail when ``omitted`` bytes were dropped."""
    return f"[... distcrond: {omitted} bytes of output omitted ...]\n"


class BoundedBuffer:
    """Keeps the first ``limit // 2`` and the last ``limit - limit // 2`` bytes of a stream.

    Feed any amount of bytes with :meth:`feed`; memory stays bounded by
    ``limit`` plus the size of one fed chunk. :meth:`result` decodes what was
    kept as UTF-8 (invalid bytes become U+FFFD) and, when the middle was
    dropped, puts a marker line naming the number of bytes omitted between the
    head and the tail. A character split by the cut is dropped whole (and
    counted as omitted) rather than shown as garbage. Not thread-safe: one
    reader feeds it.
    """

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, not {limit}")
        self.limit = limit
        self._head_limit = limit // 2
        self._tail_limit = limit - self._head_limit
        self._head = bytearray()
        # The tail is a queue of chunks: appending and dropping whole chunks copies
        # nothing, so a gigabyte passes through at the speed of the reads.
        self._tail: deque[bytes] = deque()
        self._tail_size = 0
        self._total = 0

    @property
    def total_bytes(self) -> int:
        """Bytes fed so far, kept or not."""
        return self._total

    @property
    def truncated(self) -> bool:
        """True once more than ``limit`` bytes were fed (some were dropped)."""
        return self._total > self.limit

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        """Add the next bytes of the stream."""
        if not chunk:
            return
        data = bytes(chunk)
        self._total += len(data)
        room = self._head_limit - len(self._head)
        if room > 0:
            self._head += data[:room]
            data = data[room:]
            if not data:
                return
        if self._tail_limit == 0:
            return
        if len(data) >= self._tail_limit:
            self._tail.clear()
            data = data[-self._tail_limit :]
            self._tail_size = 0
        self._tail.append(data)
        self._tail_size += len(data)
        # Drop whole old chunks while what remains still covers the tail.
        while self._tail_size - len(self._tail[0]) >= self._tail_limit:
            self._tail_size -= len(self._tail.popleft())

    def result(self) -> tuple[str, bool]:
        """The captured text and whether anything was omitted."""
        tail = b"".join(self._tail)
        if len(tail) > self._tail_limit:
            tail = tail[-self._tail_limit :]
        if not self.truncated:
            return (bytes(self._head) + tail).decode("utf-8", errors="replace"), False
        head = bytes(self._head)
        cut_head = _incomplete_suffix(head)
        if cut_head:
            head = head[:-cut_head]
        cut_tail = _dangling_prefix(tail)
        tail = tail[cut_tail:]
        omitted = self._total - len(head) - len(tail)
        head_text = head.decode("utf-8", errors="replace")
        separator = "" if not head_text or head_text.endswith("\n") else "\n"
        text = head_text + separator + omission_marker(omitted) + tail.decode("utf-8", "replace")
        return text, True
