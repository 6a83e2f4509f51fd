"""When a job's slots fall: pure functions of its schedule, its id and an instant.

:func:`next_slot` gives the first slot strictly after an instant and
:func:`slots_between` the slots of a range. Both take aware datetimes (any time
zone; a naive one is a ValueError) and give aware UTC datetimes with
microsecond resolution. Slots strictly increase: no instant is a slot twice.

Semantics, per kind of schedule:

``{"interval": "10m", "reference": "03:10", "timezone": "Europe/Berlin"}``
    The original distcrond schedule. ``reference`` defaults to ``00:00`` and
    ``timezone`` to ``UTC``. Every calendar day in the time zone, the slots
    are the wall-clock times ``reference + k * interval`` (k any integer,
    negative too) from 00:00 up to 24:00 of that day. So the example runs at
    03:10, 03:20, ... and also at 00:00, 00:10, ..., 03:00: the grid extends
    both ways within the day. Slots re-align to the reference each day: with
    an interval that divides 24 hours this is a plain grid; with one that does
    not (``7m``) the last gap of a day is shorter. Like cron, this is
    wall-clock time: a daily job (``24h``) runs once a day at its time across
    daylight-saving changes, and the DST rules below apply to every slot (in a
    repeated hour the slots run once; in a skipped hour they merge into one
    at the gap's end). For a steady pace through DST, use UTC (the default)
    or an ``every`` schedule. An interval longer than 24 hours is a plain
    elapsed-time grid anchored at the reference time on 1970-01-01 in the
    time zone.

``{"cron": "30 2 * * *", "timezone": "Europe/Berlin"}``
    A cron expression of 5 fields, or 6 with the *seconds first*
    (``"*/10 * * * * *"`` is every 10 seconds), matched against wall-clock
    time in the time zone. When day-of-month and day-of-week are both
    restricted, either matches (as in Vixie cron).

``{"every": "1h", "fuzzy": true}``
    Elapsed time: slots at ``offset + k * every`` from the Unix epoch
    (1970-01-01T00:00:00Z). ``offset`` is 0, or with ``fuzzy`` a stable
    offset inside the period derived from the job id (sha256 of the id modulo
    the period, in microseconds), so that many jobs with the same period spread
    over it instead of all starting at once, and each job keeps its offset
    across restarts, peers and versions. ``timezone`` plays no part.

Daylight-saving time, for wall-clock times (references, cron times, midnight):

- A wall-clock time that does not exist (it falls in the gap when clocks go
  forward) runs at the instant the gap ends: in Europe/Berlin on 2026-03-29,
  02:30 runs at 03:00 CEST.
- A wall-clock time that happens twice (clocks go back) runs once, at its
  first occurrence: in Europe/Berlin on 2026-10-25, 02:30 runs at 02:30 CEST.
- Wall-clock times that map to the same instant (several cron times in one
  gap) make one slot.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from itertools import takewhile
from zoneinfo import ZoneInfo

from croniter import CroniterBadDateError, croniter

from distcrond.config.models import CronSchedule, EverySchedule, IntervalSchedule, Schedule

__all__ = ["NoSlotError", "fuzzy_offset", "next_slot", "slots_between"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
_DAY_US = 86_400_000_000
# Consecutive cron wall times that may map to instants already passed; at
# most the matches within one fold (an hour), after the jump past the fold.
_MAX_CRON_SKIPS = 100_000


class NoSlotError(ValueError):
    """The schedule has no slot after the instant (a cron date that never comes, like Feb 30)."""


def next_slot(schedule: Schedule, job_id: str, after: datetime) -> datetime:
    """The job's first slot strictly after ``after`` (aware), as an aware UTC datetime.

    Raises NoSlotError when there is none, ValueError when ``after`` is naive.
    """
    for slot in _slots_after(schedule, job_id, _to_us(after)):
        return _from_us(slot)
    raise NoSlotError(f"job {job_id!r}: its schedule has no slot after {after.isoformat()}")


def slots_between(
    schedule: Schedule, job_id: str, start: datetime, end: datetime
) -> Iterator[datetime]:
    """The job's slots with ``start < slot <= end``, in increasing order (lazily).

    A schedule with no more slots just ends the iteration.
    """
    end_us = _to_us(end)
    for slot in takewhile(lambda s: s <= end_us, _slots_after(schedule, job_id, _to_us(start))):
        yield _from_us(slot)


def fuzzy_offset(job_id: str, period: timedelta) -> timedelta:
    """A fuzzy ``every`` job's offset inside its period: stable across processes and versions."""
    period_us = period // _US
    digest = hashlib.sha256(job_id.encode("utf-8")).digest()
    return timedelta(microseconds=int.from_bytes(digest, "big") % period_us)


# -- one generator per kind: strictly increasing microseconds since the epoch ----


def _slots_after(schedule: Schedule, job_id: str, after: int) -> Iterator[int]:
    if isinstance(schedule, IntervalSchedule):
        return _interval_slots(schedule, after)
    if isinstance(schedule, CronSchedule):
        return _cron_slots(schedule, after)
    if isinstance(schedule, EverySchedule):
        return _every_slots(schedule, job_id, after)
    raise TypeError(f"not a schedule: {schedule!r}")


def _grid_after(anchor: int, step: int, after: int) -> int:
    """The first ``anchor + k*step`` strictly greater than ``after``."""
    return anchor + ((after - anchor) // step + 1) * step


def _every_slots(schedule: EverySchedule, job_id: str, after: int) -> Iterator[int]:
    step = schedule.every // _US
    offset = fuzzy_offset(job_id, schedule.every) // _US if schedule.fuzzy else 0
    slot = _grid_after(offset, step, after)
    while True:
        yield slot
        slot += step


def _interval_slots(schedule: IntervalSchedule, after: int) -> Iterator[int]:
    zone = _zone(schedule.timezone)
    step = schedule.interval // _US
    if step > _DAY_US:
        slot = _grid_after(_wall_to_us(date(1970, 1, 1), schedule.reference, zone), step, after)
        while True:
            yield slot
            slot += step
    ref = schedule.reference
    ref_off = ((ref.hour * 60 + ref.minute) * 60 + ref.second) * 1_000_000 + ref.microsecond
    first_off = ref_off % step  # the day's first wall-clock offset on the grid
    local = _from_us(after).astimezone(zone).replace(tzinfo=None)
    day = local.date()
    wall_off = (local - datetime.combine(day, time(0))) // _US
    # Start at the grid offset at or before `after`'s wall-clock time: the offsets
    # before it map to instants <= after (in a repeated hour, they are skipped below).
    off = max(first_off, ref_off + ((wall_off - ref_off) // step) * step)
    last = after
    while True:
        midnight = datetime.combine(day, time(0))
        while off < _DAY_US:
            wall = midnight + timedelta(microseconds=off)
            slot = _wall_to_us(wall.date(), wall.time(), zone)
            if slot > last:  # equal: merged in a gap; smaller: a repeated hour's second pass
                yield slot
                last = slot
            off += step
        day += timedelta(days=1)
        off = first_off


def _cron_slots(schedule: CronSchedule, after: int) -> Iterator[int]:
    zone = _zone(schedule.timezone)
    start = _from_us(after).astimezone(zone)
    if start.fold and _is_ambiguous(start.replace(tzinfo=None), zone):
        # In the second pass of a repeated hour every wall time up to the
        # fold's end maps to its first occurrence, already past: skip them.
        wall = _fold_end_wall(after, zone) - timedelta(seconds=1)
    else:
        wall = start.replace(tzinfo=None, fold=0)
    six_fields = len(schedule.cron.split()) == 6
    it = croniter(schedule.cron, wall, second_at_beginning=six_fields)
    last = after
    skipped = 0
    while True:
        try:
            candidate = it.get_next(datetime)
        except CroniterBadDateError:
            return
        slot = _wall_to_us(candidate.date(), candidate.time(), zone)
        if slot <= last:  # merged with the previous slot, or before `after`
            skipped += 1
            if skipped > _MAX_CRON_SKIPS:
                raise RuntimeError(f"cron {schedule.cron!r}: no progress after {wall}")
            continue
        skipped = 0
        last = slot
        yield slot


# -- wall-clock time <-> instants ----------------------------------------------


@lru_cache(maxsize=256)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def _to_us(value: datetime) -> int:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{value.isoformat()} has no time zone; slots need aware datetimes")
    return (value - _EPOCH) // _US


def _from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def _offset_at(us: int, zone: ZoneInfo) -> timedelta | None:
    return _from_us(us).astimezone(zone).utcoffset()


def _is_ambiguous(wall: datetime, zone: ZoneInfo) -> bool:
    return (
        wall.replace(tzinfo=zone, fold=0).utcoffset()
        != wall.replace(tzinfo=zone, fold=1).utcoffset()
    )


def _wall_to_us(day: date, at: time, zone: ZoneInfo) -> int:
    """The instant of wall-clock time ``at`` on ``day``: its first occurrence, or the gap's end."""
    wall = datetime.combine(day, at.replace(tzinfo=None))
    first = _to_us(wall.replace(tzinfo=zone, fold=0))
    if _from_us(first).astimezone(zone).replace(tzinfo=None, fold=0) == wall:
        return first  # exists; fold=0 is the first occurrence when it repeats
    # In a gap fold=0 reads the wall time with the offset before the gap
    # (an instant after it) and fold=1 with the one after (an instant before).
    second = _to_us(wall.replace(tzinfo=zone, fold=1))
    return _transition(min(first, second), max(first, second), zone)


def _transition(before: int, after: int, zone: ZoneInfo) -> int:
    """The first instant in (before, after] with the UTC offset that ``after`` has."""
    target = _offset_at(after, zone)
    while after - before > 1:
        mid = (before + after) // 2
        if _offset_at(mid, zone) == target:
            after = mid
        else:
            before = mid
    return after


def _fold_end_wall(instant: int, zone: ZoneInfo) -> datetime:
    """For an instant in the second pass of a repeated hour: the wall time when the repeat ends."""
    wall = _from_us(instant).astimezone(zone).replace(tzinfo=None)
    first_offset = wall.replace(tzinfo=zone, fold=0).utcoffset()
    second_offset = wall.replace(tzinfo=zone, fold=1).utcoffset()
    assert first_offset is not None and second_offset is not None
    repeat = first_offset - second_offset
    change = _transition(instant - repeat // _US, instant, zone)
    return _from_us(change).astimezone(zone).replace(tzinfo=None, fold=0) + repeat
