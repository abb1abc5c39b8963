"""At-risk warnings, the pure part (rules/risk.py): a key customer about to drop by time alone."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from rules import risk, windows
from rules.changes import Cause, change_id
from rules.engine import compile_ruleset, evaluate
from rules.ruleset import load
from rules.schedule import next_change_at, regrade
from rules.state import CustomerState, apply_transaction
from schemas.events import Alert

RS = compile_ruleset(load("rfm-5"))
H = timedelta(days=7)
T = datetime.fromisoformat("2026-03-18T00:00:00+08:00")  # recency 7 → 8 days: R5 → R4, A → B


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def customer(amount_minor: int = 250000, n: int = 2) -> CustomerState:
    """Bought n times on 2026-03-10 (last at 11:00); graded as of then: A with 2 × 2500."""
    state = CustomerState()
    for i in range(n):
        moment = at(f"2026-03-10T{10 + i:02d}:00:00+08:00")
        apply_transaction(state, moment.timestamp(), windows.local_day(moment, RS.tz), False, amount_minor)
    state.grades = dict(evaluate(RS, state, moment).grades)
    return state


def test_a_key_customer_three_days_before_recency_crosses_a_band_gets_one_warning_with_the_exact_instant():
    state = customer()
    assert state.grades == {"value": "A"}
    assert next_change_at(RS, state, at("2026-03-10T11:00:00+08:00")) == T
    now = T - timedelta(days=3)
    alerts, look = risk.warnings("alice", RS, state, now, H)
    [alert] = alerts
    Alert.model_validate(alert)
    assert (alert["kind"], alert["severity"], alert["previous_grade"], alert["grade"]) == ("at_risk", "info", "A", "B")
    assert at(alert["due_at"]) == T and alert["due_at"] == "2026-03-18T00:00:00+08:00"
    assert alert["as_of"] == "2026-03-11T00:00:00+08:00"  # due a horizon before T, whenever the worker looked
    assert alert["dedup_key"] == "gradeflow/value/alice/at-risk"
    assert "Last purchase 8 days ago (≤ 30 days): R=4." in alert["summary"]
    assert "2026-03-18 00:00" in alert["summary"] and "A → B" in alert["summary"]
    # the id the clock's downgrade at T will carry
    assert alert["grade_change_event_id"] == change_id("alice", "value", RS, Cause("clock", None), T, "A", "B")
    changes, downgrade = regrade("alice", RS, CustomerState.from_bytes(state.to_bytes()), T, now)
    assert changes[0]["event_id"] == alert["grade_change_event_id"] == downgrade[0]["grade_change_event_id"]
    assert look is None  # B is not key: nothing more to warn about
    assert state.warned == {"value": T.timestamp()}

    # already warned for T: none, also after a restart (the mark is in the state's bytes)
    again = CustomerState.from_bytes(state.to_bytes())
    assert again.warned == state.warned
    assert risk.warnings("alice", RS, again, now + timedelta(hours=5), H)[0] == []
    # the same warning computed afresh (a crash before the state was written) has the same id and as_of
    fresh, _ = risk.warnings("alice", RS, customer(), T - timedelta(days=2), H)
    assert [(a["alert_id"], a["as_of"]) for a in fresh] == [(alert["alert_id"], alert["as_of"])]


def test_outside_the_horizon_no_warning_and_the_instant_to_look_again():
    state = customer()
    now = at("2026-03-10T11:00:00+08:00")
    assert risk.warnings("alice", RS, state, now, H) == ([], T - H)
    assert risk.warnings("alice", RS, state, T - H - timedelta(microseconds=1), H)[0] == []
    assert len(risk.warnings("alice", RS, state, T - H, H)[0]) == 1  # exactly a horizon before: due
    assert risk.warnings("alice", RS, customer(), T - H, timedelta(0)) == ([], None)  # horizon 0: disabled
    # the scheduling lower bound is never later than the instant the warning is due
    assert risk.first_look(RS, customer(), H) <= (T - H).timestamp()


def test_a_customer_who_is_not_key_gets_none():
    state = customer(amount_minor=100000, n=1)  # R5 F1 M2 = 8: B
    assert state.grades == {"value": "B"}
    assert risk.scan(RS, state, at("2026-03-15T00:00:00+08:00"), H) == ([], None)
    assert risk.warnings("bob", RS, state, at("2026-03-15T00:00:00+08:00"), H) == ([], None)
    assert risk.is_key(RS, state) is False


def test_a_purchase_moves_the_drop_and_the_new_instant_gets_its_own_warning():
    state = customer()
    [first], _ = risk.warnings("alice", RS, state, T - timedelta(days=3), H)
    moment = at("2026-03-16T09:00:00+08:00")
    apply_transaction(state, moment.timestamp(), windows.local_day(moment, RS.tz), False, 10000)
    state.grades = dict(evaluate(RS, state, moment).grades)
    assert state.grades == {"value": "A"}  # R5 F3 M3 = 11; at 8 days R4: 10, still A; at 31 days R3: 9, B
    new_t = at("2026-04-16T00:00:00+08:00")
    assert risk.warnings("alice", RS, state, moment, H) == ([], new_t - H)  # not in the horizon yet
    [second], _ = risk.warnings("alice", RS, state, new_t - H, H)
    assert at(second["due_at"]) == new_t and second["alert_id"] != first["alert_id"]
    assert state.warned == {"value": new_t.timestamp()}


def test_a_drop_within_the_key_grades_warns_too_and_the_next_one_is_found_after_it():
    # S at exactly 13 (R5 F3 M5): R4 at 8 days gives 12, A.
    state = CustomerState()
    for i in range(3):
        moment = at(f"2026-03-10T{10 + i:02d}:00:00+08:00")
        apply_transaction(state, moment.timestamp(), windows.local_day(moment, RS.tz), False, 2000000)
    state.grades = dict(evaluate(RS, state, moment).grades)
    assert state.grades == {"value": "S"}
    [alert], look = risk.warnings("sam", RS, state, T - timedelta(days=1), H)
    assert (alert["previous_grade"], alert["grade"], alert["due_at"]) == ("S", "A", "2026-03-18T00:00:00+08:00")
    assert "within the key grades" in alert["summary"]
    # after S → A at T (R4 F3 M5 = 12), A → B comes when recency passes 120 days (R1: 9): the
    # instant to look again is a horizon before it
    assert look == at("2026-07-09T00:00:00+08:00") - H


# ---------------------------------------------------------------- property: scan agrees with the clock

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from rules.ruleset import parse  # noqa: E402
from rules.schedule import next_change_at as _next  # noqa: E402
from tests.rules.rulehelp import SHANGHAI  # noqa: E402
from tests.rules.test_schedule import NOW, live  # noqa: E402

KEYED = compile_ruleset(parse("""
id: keyed
version: "1"
ladders:
  value:
    grades: [A, B, C]
    key: [A, B]
    hysteresis: {margin: 3, min_dwell_days: 2}
    decide: {metric: recency_days, bands: [{max: 7, grade: A}, {max: 30, grade: B}], else: C}
  spend:
    grades: [big, small]
    key: [big]
    decide: {metric: purchases.net.30d, bands: [{min: 1000, grade: big}], else: small}
"""))


def truth(rs, state, after: datetime, horizon: timedelta):
    """Follow the clock itself (next_change_at, regrade): the first drop from a key grade of each
    ladder within the horizon, and the first drop after it."""
    state = CustomerState.from_bytes(state.to_bytes())
    end = after + horizon
    within: dict[str, tuple] = {}
    for _ in range(40):
        due = _next(rs, state, after)
        if due is None:
            return within, None
        before = dict(state.grades)
        regrade("c", rs, state, due, NOW)
        for ladder in rs.ladders:
            held, now = before.get(ladder.name), state.grades.get(ladder.name)
            if held in ladder.key and now != held and ladder.rank[now] > ladder.rank[held]:
                if due > end:
                    return within, due
                within.setdefault(ladder.name, (held, now, due))
        after = due
    raise AssertionError("too many changes")


@pytest.mark.parametrize("rs", [KEYED, RS, compile_ruleset(load("rfm-8"))], ids=["keyed", "rfm-5", "rfm-8"])
@settings(max_examples=25, deadline=None)
@given(purchases=st.lists(st.tuples(st.integers(0, 120), st.integers(1, 3000000)), min_size=1, max_size=8),
       wait=st.integers(0, 40), horizon_days=st.integers(1, 45))
def test_property_scan_finds_exactly_the_drops_the_clock_makes(rs, purchases, wait, horizon_days):
    state = live(rs, sorted((datetime(2026, 1, 1, 9 + i % 10, tzinfo=SHANGHAI) + timedelta(days=o), a)
                            for i, (o, a) in enumerate(purchases)))
    start = datetime.fromtimestamp(state.last_event_ts, SHANGHAI)
    # bring the state up to `now` as the clock would
    now = start + timedelta(days=wait, hours=3)
    while (due := _next(rs, state, start)) is not None and due <= now:
        regrade("c", rs, state, due, NOW)
        start = due
    horizon = timedelta(days=horizon_days)
    within, beyond = truth(rs, state, now, horizon)
    drops, look = risk.scan(rs, state, now, horizon)
    assert {d.ladder: (d.grade, d.to, d.at) for d in drops} == within
    if beyond is not None:
        assert look is not None and now < look <= beyond - horizon
    if not risk.is_key(rs, state):
        assert (drops, look) == ([], None)
