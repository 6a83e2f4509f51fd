"""next_slot and slots_between: the documented semantics, by example and by property."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distcrond.config.models import CronSchedule, EverySchedule, IntervalSchedule, Schedule
from distcrond.scheduling.schedules import fuzzy_offset, next_slot, slots_between

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def interval(every: str, reference: str = "00:00", timezone: str = "UTC") -> IntervalSchedule:
    return IntervalSchedule.model_validate(
        {"interval": every, "reference": reference, "timezone": timezone}
    )


def cron(expr: str, timezone: str = "UTC") -> CronSchedule:
    return CronSchedule(cron=expr, timezone=timezone)


def every(period: str, fuzzy: bool = False) -> EverySchedule:
    return EverySchedule.model_validate({"every": period, "fuzzy": fuzzy})


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def local(
    zone: ZoneInfo,
    year: int,
    month: int,
    day: int,
    hour: int = 0,
    minute: int = 0,
    fold: int = 0,
) -> datetime:
    """A wall-clock time in ``zone``, as UTC: an aware datetime in a repeated hour never
    compares equal to one in another zone (PEP 495), so tests compare in UTC."""
    return datetime(year, month, day, hour, minute, tzinfo=zone, fold=fold).astimezone(UTC)


def walls(schedule: Schedule, zone: ZoneInfo, start: datetime, end: datetime) -> list[str]:
    """The slots in (start, end] as local 'MM-DD HH:MM:SS+offset' strings."""
    return [
        s.astimezone(zone).strftime("%m-%d %H:%M:%S%z")
        for s in slots_between(schedule, "job", start, end)
    ]


def hhmm(slots: list[datetime]) -> list[str]:
    return [s.strftime("%H:%M") for s in slots]


# -- interval + reference (the original schedule) ----------------------------------------


def test_readme_example_runs_every_ten_minutes_aligned_to_0310() -> None:
    schedule = interval("10m", "03:10")
    assert next_slot(schedule, "job", utc(2026, 5, 1, 3, 0)) == utc(2026, 5, 1, 3, 10)
    assert next_slot(schedule, "job", utc(2026, 5, 1, 3, 10)) == utc(2026, 5, 1, 3, 20)
    assert next_slot(schedule, "job", utc(2026, 5, 1, 3, 14, 59)) == utc(2026, 5, 1, 3, 20)


def test_interval_grid_extends_before_the_reference_within_the_day() -> None:
    schedule = interval("10m", "03:10")
    day = list(slots_between(schedule, "job", utc(2026, 4, 30, 23, 59), utc(2026, 5, 1, 23, 59)))
    assert hhmm(day[:3]) == ["00:00", "00:10", "00:20"]
    assert hhmm(day[-1:]) == ["23:50"]
    assert len(day) == 144


def test_interval_not_dividing_the_reference_offset_starts_the_day_off_grid() -> None:
    # 03:10 - 7*25m = 00:15: the day's grid runs through the reference, not through midnight.
    schedule = interval("25m", "03:10")
    day = list(slots_between(schedule, "job", utc(2026, 5, 1), utc(2026, 5, 2, 0, 20)))
    assert hhmm(day[:2]) == ["00:15", "00:40"]
    assert "03:10" in hhmm(day)
    assert hhmm(day[-2:]) == ["23:35", "00:15"]


def test_seven_minute_interval_realigns_at_midnight() -> None:
    schedule = interval("7m")
    slots = list(slots_between(schedule, "job", utc(2026, 1, 1, 23, 40), utc(2026, 1, 2, 0, 15)))
    assert hhmm(slots) == ["23:41", "23:48", "23:55", "00:00", "00:07", "00:14"]


def test_sub_second_interval() -> None:
    schedule = interval("250ms")
    slots = list(slots_between(schedule, "job", utc(2026, 1, 1), utc(2026, 1, 1, 0, 0, 1)))
    assert [s.microsecond for s in slots] == [250_000, 500_000, 750_000, 0]
    assert next_slot(schedule, "job", utc(2026, 1, 1, 0, 0, 0) + timedelta(microseconds=1)) == (
        utc(2026, 1, 1) + timedelta(milliseconds=250)
    )


def test_go_duration_interval_of_ninety_minutes() -> None:
    schedule = interval("1h30m", "00:30")
    day = list(slots_between(schedule, "job", utc(2026, 1, 1), utc(2026, 1, 2)))
    assert hhmm(day[:3]) == ["00:30", "02:00", "03:30"]
    assert len(day) == 16


def test_interval_longer_than_a_day_is_an_elapsed_grid_from_1970() -> None:
    schedule = interval("36h", "06:00")
    slots = list(slots_between(schedule, "job", utc(2026, 1, 1), utc(2026, 1, 6)))
    assert all(b - a == timedelta(hours=36) for a, b in itertools.pairwise(slots))
    anchor = utc(1970, 1, 1, 6)
    assert all((s - anchor) % timedelta(hours=36) == timedelta(0) for s in slots)


def test_interval_in_a_time_zone_follows_its_wall_clock() -> None:
    schedule = interval("1h", "00:30", "Asia/Kolkata")  # UTC+05:30
    assert next_slot(schedule, "job", utc(2026, 1, 1, 0, 10)) == utc(2026, 1, 1, 1, 0)


@pytest.mark.parametrize("reference", ["02:30", "03:10"])
def test_daily_interval_keeps_its_wall_clock_time_across_dst_in_berlin(reference: str) -> None:
    schedule = interval("24h", reference, "Europe/Berlin")
    spring = walls(schedule, BERLIN, utc(2026, 3, 27), utc(2026, 3, 31))
    autumn = walls(schedule, BERLIN, utc(2026, 10, 23), utc(2026, 10, 27))
    if reference == "02:30":
        # 02:30 does not exist on 03-29: it runs when the gap ends, at 03:00 CEST.
        assert spring == [
            "03-27 02:30:00+0100",
            "03-28 02:30:00+0100",
            "03-29 03:00:00+0200",
            "03-30 02:30:00+0200",
        ]
        # 02:30 happens twice on 10-25: it runs once, at the first.
        assert autumn == [
            "10-23 02:30:00+0200",
            "10-24 02:30:00+0200",
            "10-25 02:30:00+0200",
            "10-26 02:30:00+0100",
        ]
    else:
        assert spring == [
            "03-27 03:10:00+0100",
            "03-28 03:10:00+0100",
            "03-29 03:10:00+0200",
            "03-30 03:10:00+0200",
        ]
        assert autumn == [
            "10-23 03:10:00+0200",
            "10-24 03:10:00+0200",
            "10-25 03:10:00+0100",
            "10-26 03:10:00+0100",
        ]


def test_daily_interval_runs_once_on_a_25_hour_day() -> None:
    # Wall-clock semantics: ref + 24h is the next day's ref, not 23:30 of the long day.
    schedule = interval("24h", "00:30", "Europe/Berlin")
    assert walls(schedule, BERLIN, utc(2026, 10, 24), utc(2026, 10, 26, 12)) == [
        "10-25 00:30:00+0200",
        "10-26 00:30:00+0100",
    ]


def test_daily_interval_keeps_its_wall_clock_time_across_dst_in_new_york() -> None:
    schedule = interval("24h", "02:30", "America/New_York")
    assert walls(schedule, NEW_YORK, utc(2026, 3, 7, 12), utc(2026, 3, 9, 12)) == [
        "03-08 03:00:00-0400",
        "03-09 02:30:00-0400",
    ]
    assert walls(schedule, NEW_YORK, utc(2026, 10, 31, 12), utc(2026, 11, 2, 12)) == [
        "11-01 02:30:00-0500",
        "11-02 02:30:00-0500",
    ]


def test_ten_minute_interval_runs_on_the_wall_clock_grid_through_2026() -> None:
    # 144 wall-clock slots a day; on the 23-hour day the six of the skipped hour
    # (02:00-02:50) merge into 03:00 CEST, and the repeated hour runs once.
    # Also shows that a year of slots is cheap to enumerate (catching up).
    schedule = interval("10m", "03:10", "Europe/Berlin")
    start = local(BERLIN, 2026, 1, 1) - timedelta(microseconds=1)
    end = local(BERLIN, 2027, 1, 1) - timedelta(microseconds=1)
    assert sum(1 for _ in slots_between(schedule, "job", start, end)) == 365 * 144 - 6
    gap_day = walls(
        schedule, BERLIN, local(BERLIN, 2026, 3, 29, 1, 45), local(BERLIN, 2026, 3, 29, 3, 20)
    )
    assert gap_day == [
        "03-29 01:50:00+0100",
        "03-29 03:00:00+0200",
        "03-29 03:10:00+0200",
        "03-29 03:20:00+0200",
    ]


# -- cron ----------------------------------------------------------------------------------


def test_cron_in_utc() -> None:
    schedule = cron("*/15 9-17 * * 1-5")
    assert next_slot(schedule, "job", utc(2026, 5, 1, 17, 50)) == utc(
        2026, 5, 4, 9, 0
    )  # Fri -> Mon


def test_cron_with_six_fields_has_seconds_first() -> None:
    schedule = cron("*/15 * * * * *")
    slots = list(slots_between(schedule, "job", utc(2026, 1, 1), utc(2026, 1, 1, 0, 1)))
    assert [s.second for s in slots] == [15, 30, 45, 0]
    assert next_slot(cron("5 30 2 * * *"), "job", utc(2026, 1, 1)) == utc(2026, 1, 1, 2, 30, 5)


def test_cron_slot_from_a_fractional_instant_is_the_next_whole_match() -> None:
    after = utc(2026, 1, 1, 0, 0, 14) + timedelta(microseconds=999_999)
    assert next_slot(cron("*/15 * * * * *"), "job", after) == utc(2026, 1, 1, 0, 0, 15)


def test_cron_in_dst_gap_runs_when_the_gap_ends_in_berlin() -> None:
    schedule = cron("30 2 * * *", "Europe/Berlin")
    assert walls(schedule, BERLIN, utc(2026, 3, 27), utc(2026, 3, 31)) == [
        "03-27 02:30:00+0100",
        "03-28 02:30:00+0100",
        "03-29 03:00:00+0200",
        "03-30 02:30:00+0200",
    ]


def test_cron_in_dst_fold_runs_once_in_berlin() -> None:
    schedule = cron("30 2 * * *", "Europe/Berlin")
    assert walls(schedule, BERLIN, utc(2026, 10, 23), utc(2026, 10, 27)) == [
        "10-23 02:30:00+0200",
        "10-24 02:30:00+0200",
        "10-25 02:30:00+0200",
        "10-26 02:30:00+0100",
    ]


def test_cron_times_inside_the_gap_merge_into_one_slot() -> None:
    schedule = cron("*/20 2 * * *", "Europe/Berlin")
    assert walls(
        schedule, BERLIN, local(BERLIN, 2026, 3, 29), local(BERLIN, 2026, 3, 30, 2, 5)
    ) == [
        "03-29 03:00:00+0200",
        "03-30 02:00:00+0200",
    ]


def test_cron_in_the_repeated_hour_runs_only_in_its_first_pass() -> None:
    schedule = cron("*/20 2 * * *", "Europe/Berlin")
    assert walls(schedule, BERLIN, local(BERLIN, 2026, 10, 25), local(BERLIN, 2026, 10, 26)) == [
        "10-25 02:00:00+0200",
        "10-25 02:20:00+0200",
        "10-25 02:40:00+0200",
    ]


def test_cron_asked_during_the_second_pass_does_not_repeat_a_slot() -> None:
    second_pass = local(BERLIN, 2026, 10, 25, 2, 5, fold=1)
    assert second_pass == utc(2026, 10, 25, 1, 5)
    assert next_slot(cron("*/20 * * * *", "Europe/Berlin"), "job", second_pass) == local(
        BERLIN, 2026, 10, 25, 3, 0
    )
    # Every second: the walls of the second pass are all behind; the next is 03:00:00 CET.
    assert next_slot(cron("* * * * * *", "Europe/Berlin"), "job", second_pass) == local(
        BERLIN, 2026, 10, 25, 3, 0
    )


def test_cron_in_the_first_pass_continues_through_the_hour() -> None:
    first_pass = local(BERLIN, 2026, 10, 25, 2, 5)
    assert next_slot(cron("*/20 * * * *", "Europe/Berlin"), "job", first_pass) == local(
        BERLIN, 2026, 10, 25, 2, 20
    )


def test_cron_across_dst_in_new_york() -> None:
    schedule = cron("30 2 * * *", "America/New_York")
    assert walls(schedule, NEW_YORK, utc(2026, 3, 7, 12), utc(2026, 3, 9, 12)) == [
        "03-08 03:00:00-0400",
        "03-09 02:30:00-0400",
    ]
    fold = cron("30 1 * * *", "America/New_York")
    assert walls(fold, NEW_YORK, utc(2026, 10, 31, 12), utc(2026, 11, 2, 12)) == [
        "11-01 01:30:00-0400",
        "11-02 01:30:00-0500",
    ]


# -- every ----------------------------------------------------------------------------------


def test_every_without_fuzz_is_a_grid_from_the_epoch() -> None:
    assert next_slot(every("1h"), "job", utc(2026, 1, 1, 10, 5)) == utc(2026, 1, 1, 11)
    assert next_slot(every("7m"), "job", utc(2026, 1, 1)) == utc(1970, 1, 1) + timedelta(
        minutes=7 * (((utc(2026, 1, 1) - utc(1970, 1, 1)) // timedelta(minutes=7)) + 1)
    )


def test_fuzzy_every_is_offset_by_the_job_id() -> None:
    schedule = every("1d", fuzzy=True)
    offset = fuzzy_offset("backup", timedelta(days=1))
    assert next_slot(schedule, "backup", utc(2026, 1, 1)) == utc(2026, 1, 1) + offset
    assert next_slot(schedule, "backup", utc(2026, 1, 1) + offset) == utc(2026, 1, 2) + offset


def test_fuzzy_offset_is_stable() -> None:
    # Hardcoded: a change of the hash would move every fuzzy job of every cluster.
    assert fuzzy_offset("backup", timedelta(days=1)) == timedelta(
        hours=14, minutes=5, seconds=21, microseconds=435955
    )
    assert fuzzy_offset("backup", timedelta(days=1)) == fuzzy_offset("backup", timedelta(days=1))
    assert fuzzy_offset("backup", timedelta(hours=1)) < timedelta(hours=1)


# The 99.9% critical value of the chi-square distribution with 19 degrees of freedom.
CHI2_19_DOF_999 = 43.82


@pytest.mark.parametrize("period", [timedelta(days=1), timedelta(seconds=1)])
def test_fuzzy_offsets_spread_uniformly_over_the_period(period: timedelta) -> None:
    buckets = [0] * 20
    for i in range(10_000):
        buckets[fuzzy_offset(f"job-{i}", period) * 20 // period] += 1
    expected = 10_000 / 20
    chi2 = sum((n - expected) ** 2 / expected for n in buckets)
    assert chi2 < CHI2_19_DOF_999, buckets


# -- common promises --------------------------------------------------------------------------


def test_naive_datetime_is_rejected() -> None:
    with pytest.raises(ValueError, match="no time zone"):
        next_slot(every("1m"), "job", datetime(2026, 1, 1))


def test_result_is_utc_whatever_the_zone_of_after() -> None:
    slot = next_slot(cron("0 * * * *"), "job", local(BERLIN, 2026, 1, 1, 10, 30))
    assert slot.tzinfo is UTC
    assert slot == utc(2026, 1, 1, 10)


ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata"]
SCHEDULES = st.one_of(
    st.builds(
        interval,
        st.sampled_from(["250ms", "7m", "10m", "25m", "1h30m", "5h", "24h", "36h"]),
        st.sampled_from(["00:00", "00:20", "02:30", "03:10", "23:59:59"]),
        st.sampled_from(ZONES),
    ),
    st.builds(
        cron,
        st.sampled_from(
            [
                "30 2 * * *",
                "*/20 * * * *",
                "0 0 * * 0",
                "*/7 1-3 * * *",
                "10 */2 * * * *",
                "0 1 29 2 *",
            ]
        ),
        st.sampled_from(ZONES),
    ),
    st.builds(every, st.sampled_from(["100ms", "7s", "1h", "1d", "3d"]), st.booleans()),
)
# Around the 2026 DST changes of the zones above, and anywhere in 2020-2030.
TRANSITIONS = [
    utc(2026, 3, 29, 1),
    utc(2026, 10, 25, 1),
    utc(2026, 3, 8, 7),
    utc(2026, 11, 1, 6),
    utc(2026, 4, 4, 15),
    utc(2026, 10, 3, 15),
]
INSTANTS = st.one_of(
    st.builds(
        lambda base, seconds: base + timedelta(seconds=seconds),
        st.sampled_from(TRANSITIONS),
        st.floats(min_value=-2 * 86400, max_value=2 * 86400, allow_nan=False),
    ),
    st.datetimes(
        min_value=datetime(2020, 1, 1), max_value=datetime(2030, 1, 1), timezones=st.just(UTC)
    ),
)
JOB_IDS = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(SCHEDULES, JOB_IDS, INSTANTS)
def test_slots_strictly_increase_after_the_instant(
    schedule: Schedule, job_id: str, after: datetime
) -> None:
    slots = [after]
    for _ in range(5):
        slots.append(next_slot(schedule, job_id, slots[-1]))
    assert all(a < b for a, b in itertools.pairwise(slots))
    assert all(s.tzinfo is UTC for s in slots[1:])


@settings(max_examples=200, deadline=None)
@given(SCHEDULES, JOB_IDS, INSTANTS, st.floats(min_value=0, max_value=1, exclude_max=True))
def test_no_slot_is_skipped(schedule: Schedule, job_id: str, after: datetime, frac: float) -> None:
    first = next_slot(schedule, job_id, after)
    second = next_slot(schedule, job_id, first)
    # Any instant from one slot up to (not including) the next leads to the next.
    between = first + (second - first) * frac
    between = min(max(between, first), second - timedelta(microseconds=1))
    assert next_slot(schedule, job_id, between) == second
    # And any instant from `after` up to the first slot leads to the first.
    before = after + (first - after) * frac
    before = min(max(before, after), first - timedelta(microseconds=1))
    assert next_slot(schedule, job_id, before) == first


@settings(max_examples=200, deadline=None)
@given(SCHEDULES, JOB_IDS, INSTANTS, st.integers(min_value=0, max_value=3 * 86400))
def test_slots_between_equals_chained_next_slot(
    schedule: Schedule, job_id: str, start: datetime, span: int
) -> None:
    end = start + timedelta(seconds=span)
    expected: list[datetime] = []
    slot = next_slot(schedule, job_id, start)
    while slot <= end and len(expected) < 200:
        expected.append(slot)
        slot = next_slot(schedule, job_id, slot)
    got = list(itertools.islice(slots_between(schedule, job_id, start, end), 200))
    assert got == expected


@settings(max_examples=100, deadline=None)
@given(SCHEDULES, JOB_IDS, INSTANTS, st.sampled_from(ZONES))
def test_zone_of_after_does_not_matter(
    schedule: Schedule, job_id: str, after: datetime, zone: str
) -> None:
    assert next_slot(schedule, job_id, after.astimezone(ZoneInfo(zone))) == next_slot(
        schedule, job_id, after
    )


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from(ZONES),
    st.sampled_from(["02:30", "03:10", "12:00"]),
    st.dates(min_value=datetime(2020, 1, 1).date(), max_value=datetime(2030, 1, 1).date()),
)
def test_daily_interval_runs_once_a_day_at_its_wall_time(
    zone: str, reference: str, day: object
) -> None:
    tz = ZoneInfo(zone)
    schedule = interval("24h", reference, zone)
    start = datetime.combine(day, time(0), tzinfo=tz)  # type: ignore[arg-type]
    slots = list(slots_between(schedule, "job", start, start + timedelta(days=1)))
    assert len(slots) == 1
    wall = slots[0].astimezone(tz).time()
    ref = time.fromisoformat(reference)
    # At the reference, or (in a gap) when the gap ends, within the zone's largest shift.
    assert ref <= wall <= (datetime.combine(day, ref) + timedelta(hours=1)).time()  # type: ignore[arg-type]
