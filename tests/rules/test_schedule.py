"""rules/schedule.py: when time alone changes a grade, exactly."""

from __future__ import annotations

from datetime import date, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rules import windows
from rules.changes import Cause, grade
from rules.engine import compile_ruleset, evaluate
from rules.ruleset import load, parse
from rules.schedule import (_masked, Schedule, candidate_days, first_candidate_day, first_look, grades_at,
                            midnight, midnight_ts, next_change_at, next_wake, plan_of, regrade)
from rules.state import GRADED_AT, CustomerState, apply_interaction, apply_transaction, prune
from schemas.errors import RulesetError
from tests.rules.rulehelp import SHANGHAI, at

NOW = datetime(2026, 11, 23, tzinfo=SHANGHAI)
US = timedelta(microseconds=1)


def live(rs, events, state=None):
    """Fold purchases (moment, amount_minor) and grade after each, as the processor does."""
    state = state or CustomerState()
    for moment, amount in events:
        apply_transaction(state, moment.timestamp(), windows.local_day(moment, rs.tz), amount < 0, abs(amount),
                          rs.track.detail)
        prune(state, windows.local_day(moment, rs.tz), rs.retention_days)
        grade("c", rs, state, moment, Cause("transaction", "e"), NOW)
    return state


def day(d: date, n: int) -> int:
    return d.toordinal() + n


def test_recency_crossing_7_to_8_drops_a_to_b_at_that_midnight(rfm5):
    d0 = date(2026, 3, 10)
    state = live(rfm5, [(at(d0, 10), 250000), (at(d0, 11), 250000)])  # R5 F2 M3 = 10: A
    assert state.grades == {"value": "A"}
    due = next_change_at(rfm5, state, at(d0, 11))
    assert due == midnight(day(d0, 8), SHANGHAI)  # 8 days ago: R4, 9: B
    assert due.isoformat() == "2026-03-18T00:00:00+08:00"


def test_the_first_look_is_the_day_a_comparison_can_flip_not_the_day_before(rfm5):
    from rules import risk

    d0 = date(2026, 3, 10)
    state = live(rfm5, [(at(d0, 10), 250000), (at(d0, 11), 250000)])  # A, and A is a key grade
    # R=5 while recency ≤ 7: day 8 is the first day it can change, not day 7
    assert first_candidate_day(rfm5, state, d0.toordinal()) == day(d0, 8)
    assert first_look(rfm5, state) == midnight(day(d0, 8), SHANGHAI).timestamp()
    # so with the at-risk horizon of 7 days a key customer's purchase is not due at once: the
    # first look is the next midnight, when a drop on day 8 enters the horizon
    assert risk.is_key(rfm5, state)
    assert risk.first_look(rfm5, state, timedelta(days=7)) == midnight(day(d0, 1), SHANGHAI).timestamp()


FALLING = """
id: falling
version: "1"
attributes: {close_at: date}
ladders:
  stage:
    grades: [hot, warm, cold]
    decide:
      metric: days_until.close_at
      bands: [{max: 31, grade: hot}, {below: 92, grade: warm}]
      else: cold
"""


def test_a_counter_that_falls_flips_on_the_day_of_each_sides_bound():
    rs = compile_ruleset(parse(FALLING))
    close = date(2026, 6, 30).toordinal()
    state = CustomerState(attrs={"close_at": [0.0, close]})
    # days until ≤ 31 from close − 31; < 92 from close − 91
    assert candidate_days(rs, state, close - 200) == [close - 91, close - 31]
    assert first_candidate_day(rs, state, close - 200) == close - 91
    assert first_candidate_day(rs, state, close - 91) == close - 31
    assert first_candidate_day(rs, state, close - 31) is None


def test_recency_crossing_that_keeps_the_grade_is_skipped(rfm5):
    d0 = date(2026, 3, 10)
    state = live(rfm5, [(at(d0, 10), 6000000)])  # R5 F1 M5 = 11: A; day 8: R4 = 10, still A
    assert state.grades == {"value": "A"}
    assert next_change_at(rfm5, state, at(d0, 10)) == midnight(day(d0, 31), SHANGHAI)  # R3: 9 → B


def test_a_big_purchase_rolls_off_at_day_365(rfm5):
    d0 = date(2025, 1, 1)
    state = live(rfm5, [(at(d0, 10), 6000000), (at(date.fromordinal(day(d0, 364)), 10), 10000)])
    assert state.grades == {"value": "A"}  # R5 F2 M5 = 12
    due = next_change_at(rfm5, state, at(date.fromordinal(day(d0, 364)), 10))
    assert due == midnight(day(d0, 365), SHANGHAI)  # the 60000 leaves: R5 F1 M1 = 7 → B
    assert grades_at(rfm5, state, due) == {"value": "B"}
    assert grades_at(rfm5, state, due - US) == {"value": "A"}


def test_no_purchase_ever_never_changes(rfm5):
    state = CustomerState()
    apply_interaction(state, at(date(2026, 1, 1)).timestamp(), "visit")
    grade("c", rfm5, state, at(date(2026, 1, 1)), Cause("interaction", "i"), NOW)
    assert state.grades == {"value": "D"}
    assert next_change_at(rfm5, state, at(date(2026, 1, 1))) is None


def test_the_lowest_grade_with_old_purchases_is_never_due(rfm5):
    state = live(rfm5, [(at(date(2026, 1, 1)), 100)])  # R5 F1 M1 = 7: B
    due = next_change_at(rfm5, state, at(date(2026, 1, 1)))
    assert due == midnight(date(2026, 1, 1).toordinal() + 8, SHANGHAI)  # R4: 6 → C
    state.grades["value"] = "D"  # as if the clock had already brought it down
    assert next_change_at(rfm5, state, at(date(2026, 12, 1))) is None


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 400), st.integers(1, 3000000)), min_size=1, max_size=12),
       st.integers(0, 30))
def test_property_the_grade_changes_exactly_at_next_change_at(rfm5, purchases, extra_days):
    d0 = date(2025, 1, 1)
    events = sorted((at(date.fromordinal(day(d0, offset)), 9 + i % 10), amount) for i, (offset, amount) in enumerate(purchases))
    state = live(rfm5, events)
    after = events[-1][0] + timedelta(days=extra_days, hours=3)
    before = dict(state.grades)
    # the state as graded as of `after` (the clock would have caught up)
    t = next_change_at(rfm5, state, events[-1][0])
    if t is not None and t <= after:
        regrade("c", rfm5, state, t, NOW)
        after = t
        before = dict(state.grades)
    due = next_change_at(rfm5, state, after)
    look = first_look(rfm5, state, after=after.timestamp())
    assert due is None or (look is not None and after.timestamp() < look <= due.timestamp())
    last = due if due is not None else midnight(windows.local_day(after, SHANGHAI) + 400, SHANGHAI)
    # brute force: no local midnight strictly between `after` and `due` changes the grade
    d = windows.local_day(after, SHANGHAI) + 1
    while midnight(d, SHANGHAI) < last:
        assert grades_at(rfm5, state, midnight(d, SHANGHAI)) == before, date.fromordinal(d)
        d += 1
    if due is not None:
        assert due > after
        assert grades_at(rfm5, state, due - US) == before
        assert grades_at(rfm5, state, due) != before


def test_next_wake_with_a_budget_resumes_where_it_stopped(rfm5):
    d0 = date(2025, 1, 1)
    state = live(rfm5, [(at(date.fromordinal(day(d0, i)), 10), 100) for i in range(0, 40)])
    exact = next_change_at(rfm5, state, at(date.fromordinal(day(d0, 39)), 10))
    moment, changed = next_wake(rfm5, state, at(date.fromordinal(day(d0, 39)), 10), budget=1)
    hops = 0
    while not changed:
        moment, changed = next_wake(rfm5, state, moment, budget=1)
        hops += 1
    assert moment == exact and hops >= 1


def test_clock_regrade_emits_a_clock_change_and_alert_with_the_instant_as_of(rfm5):
    d0 = date(2026, 3, 10)
    state = live(rfm5, [(at(d0, 10), 250000), (at(d0, 11), 250000)])
    due = next_change_at(rfm5, state, at(d0, 11))
    changes, alerts = regrade("key", rfm5, state, due, NOW)
    assert [(c["previous_grade"], c["grade"], c["direction"], c["as_of"], c["cause"]) for c in changes] == [
        ("A", "B", "downgrade", "2026-03-18T00:00:00+08:00", {"kind": "clock", "event_id": None})]
    assert [(a["previous_grade"], a["grade"], a["severity"]) for a in alerts] == [("A", "B", "critical")]
    assert state.grade_since[GRADED_AT] == due.timestamp()
    again = CustomerState.from_bytes(state.to_bytes())
    assert regrade("key", rfm5, again, due, NOW) == ([], [])  # nothing changes: nothing emitted
    # same instant, same id (a restart repeating it emits the same event_id)
    state2 = live(rfm5, [(at(d0, 10), 250000), (at(d0, 11), 250000)])
    assert regrade("key", rfm5, state2, due, NOW)[0][0]["event_id"] == changes[0]["event_id"]
    # and the next change is computed from the clock's instant on
    # R3 at day 31 (8) and R2 at day 61 (7) keep B; R1 at day 121: 6 → C
    assert next_change_at(rfm5, state, due) == midnight(day(d0, 121), SHANGHAI)


DWELL = """
id: dwell
version: "1"
scores:
  r: {metric: recency_days, bands: [{max: 7, score: 5}, {max: 30, score: 3}], else: 1}
ladders:
  value:
    grades: [A, B, C]
    hysteresis: {min_dwell_days: 10}
    decide: {sum: [r], bands: [{min: 5, grade: A}, {min: 3, grade: B}], else: C}
"""


def test_dwell_holds_the_grade_and_its_end_is_the_change():
    rs = compile_ruleset(parse(DWELL))
    d0 = date(2026, 1, 1)
    state = live(rs, [(at(d0, 10), 100)])
    assert state.grades == {"value": "A"}
    # A since d0 10:00 (the initial grading); recency 8 at day 8 would make B, but A is held
    # for 10 days: the change is when the dwell ends
    due = next_change_at(rs, state, at(d0, 10))
    assert due == at(d0, 10) + timedelta(days=10)
    assert grades_at(rs, state, due - US) == {"value": "A"}
    regrade("c", rs, state, due, NOW)
    assert state.grades == {"value": "B"}
    # B since day 10 10:00; recency 31 at day 31 → C, and the dwell has ended by then
    due = next_change_at(rs, state, due)
    assert due == midnight(day(d0, 31), SHANGHAI)
    # a dwell that has not ended holds the grade: the change comes when it ends
    state.grade_since["value"] = midnight(day(d0, 30), SHANGHAI).timestamp() + 3600
    due = next_change_at(rs, state, due)
    assert due == midnight(day(d0, 40), SHANGHAI) + timedelta(hours=1)
    assert grades_at(rs, state, due - US) == {"value": "B"} and grades_at(rs, state, due) == {"value": "C"}


def test_b2b_pipeline_regrades_time_changes_at_month_end_only():
    rs = compile_ruleset(load("b2b-pipeline-abcd"))
    assert rs.source.ladders["pipeline"].regrade.every == "month_end"
    state = CustomerState()
    moment = at(date(2026, 1, 10))
    apply_interaction(state, moment.timestamp(), "stage_update", attributes={"expected_close_at": "2026-06-10"},
                      track=rs.track, tz=rs.tz)
    grade("c", rs, state, moment, Cause("interaction", "i"), NOW)
    assert state.grades == {"pipeline": "B"}  # 151 days to close
    # 92 days before June 10 is March 10: A then without the month-end rule, at April 1 with it
    assert next_change_at(rs, state, moment).isoformat() == "2026-04-01T00:00:00+08:00"
    assert grades_at(rs, state, at(date(2026, 3, 20))) == {"pipeline": "B"}
    assert grades_at(rs, state, midnight(date(2026, 4, 1).toordinal(), SHANGHAI)) == {"pipeline": "A"}


def test_a_relative_ladder_with_month_end_regrade_is_due_at_every_month_end():
    rs = compile_ruleset(load("key-account-abc"))
    state = live(rs, [(at(date(2026, 1, 10)), 100)])
    assert next_change_at(rs, state, at(date(2026, 1, 10))).isoformat() == "2026-02-01T00:00:00+08:00"


def test_regrade_is_validated():
    text = DWELL.replace("    hysteresis: {min_dwell_days: 10}\n", "    regrade: {every: weekly}\n")
    with pytest.raises(RulesetError) as err:
        parse(text, "bad.yaml")
    assert "ladders.value.regrade.every" in str(err.value) and "month_end" in str(err.value)
    assert compile_ruleset(parse(DWELL.replace("hysteresis: {min_dwell_days: 10}", "regrade: {every: year_end}")))


def test_schedule_pops_only_due_and_current_entries():
    s = Schedule()
    s.set(b"a", 10.0)
    s.set(b"b", 5.0)
    s.set(b"a", 3.0)  # rescheduled earlier
    s.set(b"c", 20.0)
    s.set(b"c", None)  # nothing due any more
    assert s.next_due() == 3.0
    assert s.pop_due(9.0, 100) == [(b"a", 3.0, True), (b"b", 5.0, True)]
    assert s.pop_due(100.0, 100) == [] and len(s) == 0 and s.next_due() is None


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(0, 30), st.one_of(st.none(), st.integers(0, 12)), st.booleans(),
                              st.integers(0, 4)), max_size=120))
def test_property_schedule_is_a_map_of_due_instants(ops):
    """Against a plain dict: set, get, is_exact, next_due, and pop_due (earliest first, at most ``limit``,
    only what is due, each customer once), with instants shared by many customers."""
    s, model = Schedule(), {}
    for key_n, due, exact, pop in ops:
        key = f"c{key_n}".encode()
        if pop:  # pop what is due at an instant, a few at a time
            now = float(key_n % 13)
            got = s.pop_due(now, pop)
            due_now = sorted((d, k) for k, (d, _) in model.items() if d <= now)
            assert len(got) == min(pop, len(due_now))
            assert [d for _, d, _ in got] == [d for d, _ in due_now[:len(got)]]
            for k, d, ex in got:
                assert model.pop(k) == (d, ex)
        else:
            s.set(key, None if due is None else float(due), exact)
            if due is None:
                model.pop(key, None)
            else:
                model[key] = (float(due), exact)
        assert len(s) == len(model)
        assert s.next_due() == min((d for d, _ in model.values()), default=None)
        for k, (d, ex) in model.items():
            assert s.get(k) == d and s.is_exact(k) is ex


def test_schedule_holds_each_customer_once_however_often_rescheduled():
    """Memory stays that of the customers scheduled, not of how often they were noted."""
    s = Schedule()
    for n in range(20):
        for i in range(500):
            s.set(f"c{i}".encode(), float(n * 7 + i % 5), exact=n % 2 == 0)
    assert len(s) == 500 and len(s.groups) == 5 and len(s.instants) <= 2 * 5 + 64
    assert sum(len(g.keys) for g in s.groups.values()) == 500


KINDS = ["visit", "quote_requested", "meeting", "trial_class", "referral", "call", "overdue", "complaint"]


@pytest.mark.parametrize("preset", ["rfm-5", "lifecycle", "loyalty", "rfm-8", "annual-sales-vip", "education-sadc", "risk-3",
                                    "scorecard-abc", "sales-cycle-abcde", "b2b-pipeline-abcd"])
@settings(max_examples=12, deadline=None)
@given(events=st.lists(st.tuples(st.integers(0, 500), st.integers(-1, 7), st.integers(1, 3000000)),
                       min_size=1, max_size=10))
def test_property_exact_for_other_presets(preset, events):
    """Purchases (kind -1) and interactions at random days: no midnight before next_change_at changes a
    grade, and at next_change_at one changes."""
    rs = _compiled(preset)
    state = CustomerState()
    d0 = date(2025, 1, 1)
    moments = []
    for i, (offset, kind, amount) in enumerate(sorted(events)):
        moment = at(date.fromordinal(day(d0, offset)), 9 + i % 10)
        if kind < 0:
            apply_transaction(state, moment.timestamp(), windows.local_day(moment, rs.tz), False, amount,
                              rs.track.detail)
        else:
            attrs: dict = {"stage": "trial"} if kind == 3 else {}
            for name, attr_kind in rs.track.attributes:  # dates around the event, numbers from the amount
                if attr_kind == "date" and amount % 3:
                    attrs[name] = (moment.date() + timedelta(days=amount % 400 - 100)).isoformat()
                elif attr_kind == "number" and amount % 2:
                    attrs[name] = amount % 200000
            apply_interaction(state, moment.timestamp(), KINDS[kind], windows.local_day(moment, rs.tz),
                              attrs or None, rs.track, rs.tz)
        prune(state, windows.local_day(moment, rs.tz), rs.retention_days)
        grade("c", rs, state, moment, Cause("transaction", "e"), NOW)
        moments.append(moment)
    after = moments[-1]
    before = dict(state.grades)
    due = next_change_at(rs, state, after)
    look = first_look(rs, state, after=after.timestamp())
    assert due is None or (look is not None and after.timestamp() < look <= due.timestamp())
    # the first candidate, found without collecting them all, is the first of them all
    population = {(name, 0.95): 30 + i * 7 for i, name in enumerate(plan_of(rs).counters)}
    for n in (-400, -30, -1, 0, 1, 7, 60, 200):
        after_day = windows.local_day(after, rs.tz) + n
        for pop in (None, population):
            assert first_candidate_day(rs, state, after_day, pop) == \
                next(iter(candidate_days(rs, state, after_day, pop)), None), (n, pop)
    last = due if due is not None else midnight(windows.local_day(after, SHANGHAI) + 400, SHANGHAI)
    d = windows.local_day(after, SHANGHAI) + 1
    while midnight(d, SHANGHAI) < last:
        assert grades_at(rs, state, midnight(d, SHANGHAI)) == before, date.fromordinal(d)
        d += 1
    if due is not None:
        assert grades_at(rs, state, due - US) == before
        assert grades_at(rs, state, due) != before
    # the schedule's quick grades are the engine's
    for n in (0, 1, 8, 31, 91, 181, 366, 400):
        moment = after + timedelta(days=n, hours=n % 5)
        assert grades_at(rs, state, moment) == _masked(rs, state, moment, evaluate(rs, state, moment).grades)


_CACHE: dict = {}


def _compiled(name):
    if name not in _CACHE:
        _CACHE[name] = compile_ruleset(load(name))
    return _CACHE[name]


MARGIN = """
id: margin
version: "1"
ladders:
  value:
    grades: [A, B, C]
    hysteresis: {margin: 3, min_dwell_days: 2}
    decide: {metric: recency_days, bands: [{max: 7, grade: A}, {max: 30, grade: B}], else: C}
  spend:
    grades: [big, small]
    decide: {metric: purchases.net.30d, bands: [{min: 1000, grade: big}], else: small}
"""


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 120), st.integers(1, 200000)), min_size=1, max_size=8))
def test_property_exact_with_margin_dwell_and_two_ladders(purchases):
    rs = _CACHE.get("margin") or _CACHE.setdefault("margin", compile_ruleset(parse(MARGIN)))
    d0 = date(2026, 1, 1)
    state = live(rs, sorted((at(date.fromordinal(day(d0, o)), 9 + i % 10), a) for i, (o, a) in enumerate(purchases)))
    after = datetime.fromtimestamp(state.last_event_ts, SHANGHAI)
    for _ in range(3):  # follow the clock through successive changes
        before = dict(state.grades)
        due = next_change_at(rs, state, after)
        last = due if due is not None else midnight(windows.local_day(after, SHANGHAI) + 200, SHANGHAI)
        d = windows.local_day(after, SHANGHAI) + 1
        while midnight(d, SHANGHAI) < last:
            assert grades_at(rs, state, midnight(d, SHANGHAI)) == before, date.fromordinal(d)
            d += 1
        if due is None:
            break
        assert grades_at(rs, state, due - US) == before and grades_at(rs, state, due) != before
        regrade("c", rs, state, due, NOW)
        after = due


def test_midnight_ts_is_midnight_even_where_a_dst_gap_moves_it():
    from zoneinfo import ZoneInfo

    havana = ZoneInfo("America/Havana")  # DST starts at midnight: the day begins at 01:00
    for d in (date(2025, 3, 9), date(2025, 3, 10), date(2026, 11, 23)):
        for tz in (SHANGHAI, havana):
            assert midnight_ts(d.toordinal(), tz) == midnight(d.toordinal(), tz).timestamp()
            ts = midnight_ts(d.toordinal(), tz)  # the day's first instant
            assert windows.day_of_ts(ts, tz) == d.toordinal() and windows.day_of_ts(ts - 1, tz) < d.toordinal()
    gap = midnight_ts(date(2025, 3, 9).toordinal(), havana)
    assert datetime.fromtimestamp(gap, havana).hour == 1  # 00:00 did not exist that day
