"""RFC 3339 timestamps with an offset: the one parser for events' ``occurred_at``.

Both the fast decoder and the pydantic models use it, so they refuse the same
strings. ``datetime.fromisoformat`` alone takes ISO 8601 forms that are not
RFC 3339 (``20250101T000000+0800``, week dates, no seconds), and pydantic's
lax datetime takes Unix times; neither is the contract.
"""

from __future__ import annotations

import re
from datetime import datetime

from schemas.errors import InvalidEvent

RFC3339_PATTERN = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})$"
)
_RFC3339 = re.compile(RFC3339_PATTERN)


def parse_rfc3339(value: object, field: str = "occurred_at") -> datetime:
    """An aware datetime from an RFC 3339 string with offset, or ``InvalidEvent("invalid_timestamp")``."""
    if not isinstance(value, str):
        raise InvalidEvent("invalid_timestamp", f"field {field!r} must be an RFC 3339 string")
    if not _RFC3339.fullmatch(value):
        if re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9:.]+", value):
            raise InvalidEvent("invalid_timestamp", f"{field} {value[:64]!r} has no UTC offset")
        raise InvalidEvent("invalid_timestamp", f"{field} {value[:64]!r} is not an RFC 3339 timestamp")
    try:
        return datetime.fromisoformat(value.upper())
    except ValueError:
        raise InvalidEvent("invalid_timestamp", f"{field} {value[:64]!r} is not a valid date and time") from None


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days from 1970-01-01 to a proleptic Gregorian date (H. Hinnant's algorithm: integers only)."""
    if month <= 2:
        year -= 1
    era = year // 400
    yoe = year - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


_EXACT = 2**53  # integers of a double's mantissa


def _two(value: str, at: int) -> int:
    # The pattern has checked that these are ASCII digits; int() of a slice costs five times more.
    return (ord(value[at]) - 48) * 10 + ord(value[at + 1]) - 48


def epoch_seconds(value: str, moment: datetime) -> float:
    """``moment.timestamp()`` where ``moment = parse_rfc3339(value)``, from the string's fields.

    Equal to the bit: both are the exact count of microseconds since the epoch divided by 10**6,
    rounded once. ``datetime.timestamp()`` of an aware datetime builds two offsets and two
    timedeltas to get there. The microseconds are the datetime's (``fromisoformat`` decides what a
    fraction of more than six digits gives)."""
    offset = 0
    if value[-1] != "Z" and value[-1] != "z":
        offset = _two(value, len(value) - 5) * 3600 + _two(value, len(value) - 2) * 60
        if value[-6] == "-":
            offset = -offset
    days = _days_from_civil(_two(value, 0) * 100 + _two(value, 2), _two(value, 5), _two(value, 8))
    seconds = days * 86400 + _two(value, 11) * 3600 + _two(value, 14) * 60 + _two(value, 17) - offset
    micros = seconds * 1_000_000 + moment.microsecond
    if -_EXACT < micros < _EXACT:
        # Both exact as doubles, so one division rounds as Python's int / int does.
        return micros / 1_000_000
    return moment.timestamp()  # past the year 2255: compiled int / int would round twice
