"""Rolling 365-day windows of daily buckets (rules/windows.py) and their use by the engine."""

from __future__ import annotations

import random
from datetime import date, datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from rules import windows
from rules.engine import evaluate
from rules.state import CustomerState

from tests.rules.rulehelp import SHANGHAI, buy

X = date(2025, 1, 1).toordinal()


def test_purchase_counts_through_day_x_plus_364_and_not_on_x_plus_365() -> None:
    buckets: windows.Buckets = {}
    windows.add(buckets, X, 1, 12_50)
    assert windows.totals(buckets, X, 365) == (1, 12_50)
    assert windows.totals(buckets, X + 364, 365) == (1, 12_50)
    assert windows.totals(buckets, X + 365, 365) == (0, 0)
    # Nor does a bucket count before its own day.
    assert windows.totals(buckets, X - 1, 365) == (0, 0)


def test_roll_off_follows_shanghai_local_days_not_utc(rfm5) -> None:
    # 2025-01-01T23:30+08:00 is 15:30 UTC the same day; local day X = 2025-01-01.
    state = CustomerState()
    buy(state, datetime.fromisoformat("2025-01-01T23:30:00+08:00"), 100_000_00, rfm5)
    # 2025-12-31T15:59:59Z is 23:59:59 on 2025-12-31 in Shanghai: day X+364, still inside.
    inside = evaluate(rfm5, state, datetime(2025, 12, 31, 15, 59, 59, tzinfo=timezone.utc))
    assert (inside.frequency, inside.monetary_minor) == (1, 100_000_00)
    assert inside.recency_days == 364
    # One second later it is 2026-01-01 00:00 in Shanghai (day X+365) while still
    # 2025-12-31 in UTC: the purchase has left the window.
    outside = evaluate(rfm5, state, datetime(2025, 12, 31, 16, 0, 0, tzinfo=timezone.utc))
    assert (outside.frequency, outside.monetary_minor) == (0, 0)
    assert outside.recency_days == 365


def test_a_purchase_just_after_local_midnight_belongs_to_the_next_local_day(rfm5) -> None:
    state = CustomerState()
    # 16:30 UTC on Jan 1 is 00:30 on Jan 2 in Shanghai.
    buy(state, datetime(2025, 1, 1, 16, 30, tzinfo=timezone.utc), 1_00, rfm5)
    assert list(state.buckets) == [X + 1]


def test_refunds_lower_net_and_are_not_purchases(rfm5) -> None:
    state = CustomerState()
    bought = datetime.fromisoformat("2025-03-01T10:00:00+08:00")
    refunded = datetime.fromisoformat("2025-03-05T10:00:00+08:00")
    buy(state, bought, 300_00, rfm5)
    buy(state, refunded, 120_00, rfm5, refund=True)
    day = windows.local_day(refunded, SHANGHAI)
    assert windows.totals(state.buckets, day, 365) == (1, 180_00)
    # The refund is on its own day, not on the purchase's.
    assert state.buckets[day] == [0, -120_00]
    # Recency still counts from the purchase, not the refund.
    assert state.last_purchase_ts == bought.timestamp()
    ev = evaluate(rfm5, state, refunded)
    assert (ev.recency_days, ev.frequency, ev.monetary_minor) == (4, 1, 180_00)


def test_refund_only_customer_has_no_purchase(rfm5) -> None:
    state = CustomerState()
    buy(state, datetime.fromisoformat("2025-03-05T10:00:00+08:00"), 50_00, rfm5, refund=True)
    assert state.last_purchase_ts is None and state.first_purchase_ts is None
    ev = evaluate(rfm5, state, datetime.fromisoformat("2025-03-06T10:00:00+08:00"))
    assert (ev.recency_days, ev.frequency, ev.monetary_minor) == (None, 0, -50_00)


def test_out_of_order_events_land_in_their_bucket_and_match_in_order_totals(rfm5) -> None:
    start = datetime.fromisoformat("2025-01-01T09:00:00+08:00")
    events = [(start + timedelta(days=3 * i, hours=i), (i + 1) * 10_00, i % 4 == 3) for i in range(40)]
    in_order = CustomerState()
    for moment, amount, refund in events:
        buy(in_order, moment, amount, rfm5, refund)
    shuffled = events[:]
    random.Random(7).shuffle(shuffled)
    assert shuffled != events
    late = CustomerState()
    for moment, amount, refund in shuffled:
        buy(late, moment, amount, rfm5, refund)
    assert late.buckets == in_order.buckets
    assert late.last_purchase_ts == in_order.last_purchase_ts
    assert late.first_purchase_ts == in_order.first_purchase_ts
    # A late event lands in the bucket of its own local day.
    moment, amount, refund = events[5]
    assert not refund
    assert in_order.buckets[windows.local_day(moment, SHANGHAI)] == [1, amount]
    end = windows.local_day(events[-1][0], SHANGHAI)
    assert windows.totals(late.buckets, end, 365) == windows.totals(in_order.buckets, end, 365)


@settings(max_examples=200, deadline=None)
@given(
    days=st.lists(st.integers(min_value=0, max_value=1500), min_size=1, max_size=60),
    amounts=st.lists(st.integers(min_value=-10_000, max_value=10_000), min_size=60, max_size=60),
    as_of=st.integers(min_value=0, max_value=1500),
    later=st.integers(min_value=0, max_value=800),
    window=st.sampled_from([1, 7, 30, 365]),
)
def test_prune_never_removes_a_bucket_still_inside_the_window(days, amounts, as_of, later, window) -> None:
    buckets: windows.Buckets = {}
    for day, amount in zip(days, amounts):
        windows.add(buckets, X + day, 1, amount)
    before = {d: list(b) for d, b in buckets.items()}
    windows.prune(buckets, X + as_of, window)
    first = X + as_of - window + 1
    # Every bucket that is in the window now or on any later day survives intact.
    assert {d: b for d, b in before.items() if d >= first} == buckets
    for day in (X + as_of, X + as_of + later):
        expected = sum(1 for d in days if day - window + 1 <= X + d <= day), sum(
            a for d, a in zip(days, amounts) if day - window + 1 <= X + d <= day)
        assert windows.totals(buckets, day, window) == expected


def test_bucket_count_stays_bounded_by_the_window() -> None:
    buckets: windows.Buckets = {}
    most = 0
    for day in range(X, X + 3 * 365 + 1):
        windows.add(buckets, day, 1, 1_00)
        windows.prune(buckets, day, 365)
        most = max(most, len(buckets))
    assert most == 365
    assert len(buckets) == 365
    assert windows.totals(buckets, X + 3 * 365, 365) == (365, 365_00)


_ZONES = ["Asia/Shanghai", "America/New_York", "Europe/London", "Australia/Lord_Howe", "Asia/Kolkata",
          "Pacific/Chatham", "America/St_Johns", "UTC"]


@settings(max_examples=400, deadline=None)
@given(zone=st.sampled_from(_ZONES), ts=st.floats(min_value=-2.5e9, max_value=4.2e9, allow_nan=False))
def test_day_of_ts_agrees_with_datetime_in_every_zone(zone: str, ts: float) -> None:
    from zoneinfo import ZoneInfo

    tz = ZoneInfo(zone)
    assert windows.day_of_ts(ts, tz) == datetime.fromtimestamp(ts, tz).toordinal()


def test_day_of_ts_is_exact_around_dst_transitions_and_odd_historic_offsets() -> None:
    from zoneinfo import ZoneInfo

    # New York's 2026 spring-forward (07:00 UTC) and fall-back (06:00 UTC), Lord Howe's
    # half-hour shift, and Shanghai's 1901 LMT → CST change at an odd second.
    cases = [("America/New_York", datetime(2026, 3, 8, 7, tzinfo=timezone.utc)),
             ("America/New_York", datetime(2026, 11, 1, 6, tzinfo=timezone.utc)),
             ("Australia/Lord_Howe", datetime(2026, 4, 4, 15, tzinfo=timezone.utc)),
             ("Asia/Shanghai", datetime(1900, 12, 31, 15, 54, 17, tzinfo=timezone.utc))]
    for zone, moment in cases:
        tz = ZoneInfo(zone)
        base = moment.timestamp()
        for delta in range(-7200, 7201, 17):
            ts = base + delta
            assert windows.day_of_ts(ts, tz) == datetime.fromtimestamp(ts, tz).toordinal(), (zone, delta)
