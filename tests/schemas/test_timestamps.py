"""schemas/timestamps.py: ``epoch_seconds`` is ``datetime.timestamp()`` to the bit, for every string the parser takes."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

from hypothesis import example, given, settings
from hypothesis import strategies as st

from schemas.timestamps import _days_from_civil, epoch_seconds, parse_rfc3339

offsets = st.integers(min_value=-(23 * 60 + 59), max_value=23 * 60 + 59)  # minutes, as RFC 3339 writes them


@st.composite
def rfc3339(draw: st.DrawFn) -> str:
    # Hypothesis takes naive bounds (a time zone is drawn separately, through its `timezones`).
    moment = draw(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)))  # noqa: DTZ001
    digits = draw(st.sampled_from([0, 1, 3, 6, 7, 9]))
    fraction = "" if digits == 0 else "." + "".join(draw(st.lists(st.sampled_from("0123456789"),
                                                                min_size=digits, max_size=digits)))
    minutes = draw(offsets)
    if minutes == 0 and draw(st.booleans()):
        zone = draw(st.sampled_from(["Z", "z"]))
    else:
        sign = "-" if minutes < 0 or (minutes == 0 and draw(st.booleans())) else "+"
        zone = f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
    sep = draw(st.sampled_from(["T", "t", " "]))
    return f"{moment.year:04d}-{moment:%m-%d}{sep}{moment:%H:%M:%S}{fraction}{zone}"


@settings(max_examples=3000)
@given(rfc3339())
@example("2256-01-01T00:00:00.000001+00:01")  # past 2**53 µs: compiled int / int rounded twice here
@example("9999-12-31T23:59:59.999999-23:59")
def test_epoch_seconds_is_the_datetimes_timestamp(value: str) -> None:
    moment = parse_rfc3339(value)
    assert epoch_seconds(value, moment) == moment.timestamp()


def test_epoch_seconds_of_known_instants() -> None:
    for value, expected in [("1970-01-01T00:00:00Z", 0.0), ("1970-01-01T08:00:00+08:00", 0.0),
                            ("1969-12-31T23:59:59.999999-00:00", -0.000001),
                            ("2024-02-29T12:30:00.5+05:30", 1709190000.5),
                            ("2026-01-01T10:00:00+08:00", 1767232800.0)]:
        assert epoch_seconds(value, parse_rfc3339(value)) == expected, value


@given(st.dates())
def test_days_from_civil_counts_days_from_the_epoch(day) -> None:
    assert _days_from_civil(day.year, day.month, day.day) == (day - date(1970, 1, 1)).days


def test_an_offset_far_from_utc_moves_the_instant_by_it() -> None:
    east, west = parse_rfc3339("2026-03-01T00:00:00+14:00"), parse_rfc3339("2026-03-01T00:00:00-12:00")
    assert epoch_seconds("2026-03-01T00:00:00-12:00", west) - epoch_seconds("2026-03-01T00:00:00+14:00", east) \
        == timedelta(hours=26).total_seconds()
    assert east.tzinfo == timezone(timedelta(hours=14))
