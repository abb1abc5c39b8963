"""Rolling windows of event time as bounded daily buckets.

A customer's purchases are kept as one bucket per local calendar day (in the
ruleset's time zone): ``{day_ordinal: [purchases, net_minor]}``, or, when the
ruleset uses gross sums or the largest purchase, ``[purchases, net_minor,
gross_minor, largest_minor]``. A window of
N days as of day D covers the days ``D-N+1 … D``: a purchase made on day X
counts up to and including day ``X+N-1`` and no longer on day ``X+N``. State
per customer is therefore at most N buckets, whatever the customer buys.
"""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

Buckets = dict[int, list[int]]


_EPOCH_ORDINAL = 719163  # date(1970, 1, 1).toordinal()
_HOUR_S = 3600
# (zone, Unix hour) → the zone's UTC offset in seconds throughout that hour. Converting with
# astimezone() costs about a microsecond per call and the hot path needs several per event;
# offsets change only at a zone's transitions, so one lookup per hour is exact.
_OFFSETS: dict[tuple[object, int], int] = {}
_OFFSETS_MAX = 100_000


def _offset_s(ts: float, tz: ZoneInfo) -> int:
    hour = int(ts // _HOUR_S)
    key = (tz, hour)
    offset = _OFFSETS.get(key)
    if offset is not None:
        return offset
    at_start = datetime.fromtimestamp(hour * _HOUR_S, tz).utcoffset()
    at_end = datetime.fromtimestamp(hour * _HOUR_S + _HOUR_S - 1, tz).utcoffset()
    assert at_start is not None and at_end is not None
    if at_start != at_end:  # a transition inside this hour: no shortcut
        moment = datetime.fromtimestamp(ts, tz).utcoffset()
        assert moment is not None
        return int(moment.total_seconds())
    if len(_OFFSETS) >= _OFFSETS_MAX:
        _OFFSETS.clear()
    offset = _OFFSETS[key] = int(at_start.total_seconds())
    return offset


def local_day(moment: datetime, tz: ZoneInfo) -> int:
    """The proleptic Gregorian ordinal of ``moment``'s calendar date in ``tz``."""
    return day_of_ts(moment.timestamp(), tz)


def add(buckets: Buckets, day: int, purchases: int, net_minor: int) -> None:
    """Add to the bucket of ``day``; out-of-order days land where they belong."""
    bucket = buckets.get(day)
    if bucket is None:
        buckets[day] = [purchases, net_minor]
    else:
        bucket[0] += purchases
        bucket[1] += net_minor


def totals(buckets: Buckets, as_of_day: int, days: int) -> tuple[int, int]:
    """Purchases and net amount (minor units) in the ``days``-day window ending on ``as_of_day``."""
    first = as_of_day - days + 1
    purchases = 0
    net = 0
    for day, bucket in buckets.items():
        if first <= day <= as_of_day:
            purchases += bucket[0]
            net += bucket[1]
    return purchases, net


def prune(buckets: Buckets, as_of_day: int, days: int) -> None:
    """Drop buckets that can never again fall inside a ``days``-day window (time only moves forward)."""
    first = as_of_day - days + 1
    for day in [d for d in buckets if d < first]:
        del buckets[day]


# The last (ts, tz, day) day_of_ts computed: one event asks for the day of the same instant
# several times (folding it, pruning, every window and recency as of it).
_LAST: tuple[float, object, int] = (float("nan"), None, 0)


def day_of_ts(ts: float, tz: ZoneInfo) -> int:
    """The local day ordinal of a Unix timestamp in ``tz`` (as ``datetime.fromtimestamp(ts, tz)`` has it)."""
    global _LAST
    last = _LAST
    if last[0] == ts and last[1] is tz:
        return last[2]
    secs = int(ts // 1)
    frac = ts - secs
    # datetime rounds to the microsecond, half to even: 23:59:59.9999996 is already tomorrow.
    if frac > 0.999999 and round(frac * 1e6) >= 1_000_000:
        secs += 1
    day = (secs + _offset_s(secs, tz)) // 86400 + _EPOCH_ORDINAL
    _LAST = (ts, tz, day)
    return day


def average_daily_balance(base: int, flows: dict[int, int], first: int, last: int) -> int:
    """Mean end-of-day balance over the days ``first … last`` (minor units, rounded down).

    ``base`` is the balance before every day in ``flows`` (the net deposits
    minus withdrawals of each local day). Days before a customer's first flow
    have the base balance (0 for a new customer).
    """
    n = last - first + 1
    if n <= 0:
        return 0
    opening = base
    weighted = 0
    for day, flow in flows.items():
        if day <= first:
            opening += flow
        elif day <= last:
            weighted += flow * (last - day + 1)
    return (opening * n + weighted) // n
