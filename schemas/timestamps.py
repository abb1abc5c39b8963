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
