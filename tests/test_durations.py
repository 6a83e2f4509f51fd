"""Go duration syntax, as the original distcrond's job files used it."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distcrond.config.durations import format_duration, parse_duration, parse_duration_ns


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("1ns", 1),
        ("7us", 7_000),
        ("7µs", 7_000),  # micro sign
        ("7μs", 7_000),  # greek mu
        ("250ms", 250_000_000),
        ("30s", 30_000_000_000),
        ("10m", 600_000_000_000),
        ("2h", 7_200_000_000_000),
        ("1d", 86_400_000_000_000),
        ("1h30m", 5_400_000_000_000),
        ("1h30m15s500ms", 5_415_500_000_000),
        ("1.5h", 5_400_000_000_000),
        (".5s", 500_000_000),
        ("1.s", 1_000_000_000),
        ("0", 0),
        ("+5s", 5_000_000_000),
        ("0s", 0),
        ("2m2m", 240_000_000_000),  # Go adds repeated units
    ],
)
def test_go_duration_parses_to_nanoseconds(text: str, ns: int) -> None:
    assert parse_duration_ns(text) == ns


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10m", timedelta(minutes=10)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("1.5h", timedelta(hours=1, minutes=30)),
        ("250ms", timedelta(milliseconds=250)),
        ("3us", timedelta(microseconds=3)),
        ("2000ns", timedelta(microseconds=2)),
    ],
)
def test_parse_duration_gives_a_timedelta(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("10", "expected a number and a unit"),
        ("10x", "expected a number and a unit"),
        ("h", "expected a number and a unit"),
        ("1h 30m", "expected a number and a unit"),
        ("-5s", "negative"),
        ("1.5ns", "finer than one nanosecond"),
        ("ten minutes", "expected a number and a unit"),
    ],
)
def test_invalid_duration_is_rejected_with_a_reason(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_duration_ns(text)


def test_duration_finer_than_a_microsecond_is_rejected_not_rounded() -> None:
    with pytest.raises(ValueError, match="finer than one microsecond"):
        parse_duration("1500ns")


def test_non_string_duration_is_rejected() -> None:
    with pytest.raises(ValueError, match="must be a string"):
        parse_duration_ns(10)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (timedelta(0), "0s"),
        (timedelta(minutes=10), "10m"),
        (timedelta(hours=1, minutes=30), "1h30m"),
        (timedelta(milliseconds=250), "250ms"),
        (timedelta(days=2), "48h"),
        (timedelta(seconds=1, microseconds=5), "1s5us"),
    ],
)
def test_format_duration_is_compact_go_syntax(value: timedelta, text: str) -> None:
    assert format_duration(value) == text


@settings(max_examples=200, deadline=None)
@given(st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=3650)))
def test_format_then_parse_round_trips(value: timedelta) -> None:
    assert parse_duration(format_duration(value)) == value
