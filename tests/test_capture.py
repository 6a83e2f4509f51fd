"""BoundedBuffer: the head and tail of a stream, in bounded memory."""

from __future__ import annotations

import tracemalloc

import pytest

from distcrond.execution.capture import BoundedBuffer, omission_marker


def feed_all(buf: BoundedBuffer, data: bytes, chunk: int) -> None:
    for i in range(0, len(data), chunk):
        buf.feed(data[i : i + chunk])


def test_output_within_limit_is_kept_whole() -> None:
    buf = BoundedBuffer(100)
    buf.feed(b"hello ")
    buf.feed(b"world\n")
    assert buf.result() == ("hello world\n", False)
    assert buf.total_bytes == 12


def test_output_of_exactly_the_limit_is_not_truncated() -> None:
    data = bytes(range(65, 75)) * 10  # 100 ASCII bytes
    buf = BoundedBuffer(100)
    feed_all(buf, data, 7)
    assert buf.result() == (data.decode(), False)


def test_empty_stream_gives_empty_text() -> None:
    assert BoundedBuffer(10).result() == ("", False)


def test_truncation_keeps_head_and_tail_with_a_marker_naming_the_omitted_bytes() -> None:
    data = b"HEAD" + b"x" * 10_000 + b"TAIL"
    buf = BoundedBuffer(8)
    feed_all(buf, data, 333)
    text, truncated = buf.result()
    assert truncated
    assert buf.truncated
    assert text == "HEAD\n" + omission_marker(10_000) + "TAIL"


def test_marker_is_its_own_line_when_head_ends_with_newline() -> None:
    buf = BoundedBuffer(4)
    buf.feed(b"a\n" + b"-" * 50 + b"z\n")
    text, _ = buf.result()
    assert text == "a\n" + omission_marker(50) + "z\n"


@pytest.mark.parametrize("chunk", [1, 3, 64, 1000, 100_000])
def test_result_does_not_depend_on_chunking(chunk: int) -> None:
    data = bytes(32 + i % 95 for i in range(20_000))  # printable ASCII
    whole = BoundedBuffer(1000)
    whole.feed(data)
    pieces = BoundedBuffer(1000)
    feed_all(pieces, data, chunk)
    assert pieces.result() == whole.result()
    text, truncated = whole.result()
    assert truncated
    assert text.startswith(data[:500].decode())
    assert text.endswith(data[-500:].decode())


def test_text_is_at_most_limit_plus_marker() -> None:
    buf = BoundedBuffer(1000)
    feed_all(buf, b"\xff" * 100_000, 4096)  # every byte invalid: one U+FFFD each
    text, truncated = buf.result()
    assert truncated
    assert len(text) <= 1000 + len("\n" + omission_marker(buf.total_bytes))


def test_invalid_utf8_is_decoded_with_replacement() -> None:
    buf = BoundedBuffer(100)
    buf.feed(b"ok \xff\xfe end")
    assert buf.result() == ("ok \ufffd\ufffd end", False)


def test_character_cut_at_head_boundary_is_dropped_not_garbled() -> None:
    # Head keeps 5 bytes: "abcd" and the first byte of "é" (C3 A9).
    data = "abcdé".encode() + b"-" * 100 + b"tail!"
    buf = BoundedBuffer(10)
    buf.feed(data)
    text, truncated = buf.result()
    assert truncated
    assert "\ufffd" not in text
    assert text == "abcd\n" + omission_marker(len(data) - 9) + "tail!"


def test_character_cut_at_tail_boundary_is_dropped_not_garbled() -> None:
    # Tail keeps the last 5 bytes: the last two of "€" (E2 82 AC) then "xyz".
    data = b"head!" + b"-" * 100 + "€xyz".encode()
    buf = BoundedBuffer(10)
    feed_all(buf, data, 1)
    text, truncated = buf.result()
    assert truncated
    assert "\ufffd" not in text
    assert text == "head!\n" + omission_marker(len(data) - 8) + "xyz"


def test_four_byte_characters_survive_both_cuts() -> None:
    emoji = "😀".encode()  # 4 bytes
    data = emoji * 1000
    for limit in range(2, 20):
        text, truncated = _fed(limit, data).result()
        assert truncated
        assert "\ufffd" not in text, limit
        head, _, tail = text.partition("[... distcrond:")
        assert set(head.strip("\n")) <= {"😀"}
        assert set(tail.split("]\n", 1)[1]) <= {"😀"}


def _fed(limit: int, data: bytes) -> BoundedBuffer:
    buf = BoundedBuffer(limit)
    feed_all(buf, data, 7)
    return buf


def test_zero_limit_keeps_nothing_but_counts() -> None:
    buf = BoundedBuffer(0)
    buf.feed(b"abc")
    assert buf.result() == (omission_marker(3), True)


def test_negative_limit_is_rejected() -> None:
    with pytest.raises(ValueError):
        BoundedBuffer(-1)


def test_memory_stays_bounded_while_much_more_is_fed() -> None:
    limit = 1 << 20
    chunk = b"y" * (1 << 16)
    buf = BoundedBuffer(limit)
    tracemalloc.start()
    try:
        for _ in range(4000):  # 256 MiB
            buf.feed(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert buf.total_bytes == 4000 * len(chunk)
    assert peak < limit + 4 * len(chunk)
    text, truncated = buf.result()
    assert truncated
    assert len(text) <= limit + len("\n" + omission_marker(buf.total_bytes))
