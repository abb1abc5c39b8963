"""rules/shadow.py: which candidates can run as a shadow, and grading one beside the active ruleset."""

from __future__ import annotations

from datetime import date, datetime, timezone

import pytest

from rules import shadow
from rules.changes import Cause, grade
from rules.engine import compile_ruleset, evaluate
from rules.ruleset import load, parse
from rules.state import CustomerState
from schemas.events import ShadowDiff
from tests.rules.rulehelp import at, buy
from tests.rules.shadowhelp import RFM5, candidate

RS = compile_ruleset(load("rfm-5"))
NOW = datetime(2026, 7, 1, tzinfo=timezone.utc)


def test_a_compatible_candidate_runs_with_the_active_tracking():
    cand = candidate()
    assert shadow.problems(RS, cand) == []
    (prepared,) = shadow.prepare(RS, [cand])
    assert prepared.key == "rfm-5@2" and prepared.track == RS.track


@pytest.mark.parametrize("change, problem", [
    ({}, "another version"),
    ({"window_days: 365": "window_days: 730"}, "needs 730 days of history; the active ruleset keeps 365"),
    ({"timezone: Asia/Shanghai": "timezone: Europe/Paris"}, "timezone Europe/Paris"),
    ({"currency: CNY": "currency: EUR"}, "currency EUR"),
])
def test_a_candidate_the_state_cannot_serve_is_refused_with_why(change, problem):
    version = "1" if not change else "2"
    cand = candidate(version, **change)
    with pytest.raises(ValueError, match="rfm-5@" + version + ": .*" + problem):
        shadow.prepare(RS, [cand])


def test_relative_grades_and_duplicates_are_refused():
    relative = compile_ruleset(load("rfm-8-median"))
    found = shadow.problems(RS, relative)
    assert any("relative to the population" in p for p in found)
    with pytest.raises(ValueError, match="rfm-5@2: given twice"):
        shadow.prepare(RS, [candidate(), candidate()])


def test_shadow_grading_leaves_the_active_grades_untouched_and_rides_in_the_state():
    cand, = shadow.prepare(RS, [candidate()])
    state = CustomerState()
    when = at(date(2026, 3, 10))
    buy(state, when, 200_000, RS)
    buy(state, when.replace(hour=13), 200_000, RS)  # R5 F2 and 4000 CNY: M2 (B) under rfm-5, M3 (A) under the candidate
    grade("c1", RS, state, when, Cause("transaction", "e1"), NOW)
    active = (dict(state.grades), dict(state.grade_since), state.ruleset)
    shadow.follow_event((cand,), "c1", state, when, when.timestamp(), Cause("transaction", "e1"), NOW)
    assert (dict(state.grades), dict(state.grade_since), state.ruleset) == active
    alone = CustomerState.from_bytes(state.to_bytes())
    alone.shadow = {}
    assert state.shadow["rfm-5@2"]["g"] == evaluate(cand, alone, when).grades
    assert state.grades == {"value": "B"} and state.shadow["rfm-5@2"]["g"] == {"value": "A"}
    # the state's bytes carry it, and a reader without shadows keeps reading the rest
    back = CustomerState.from_bytes(state.to_bytes())
    assert back.shadow == state.shadow and back.grades == state.grades
    assert CustomerState.graded_by(state.to_bytes(), RS.key)


def test_the_record_says_what_differs_and_validates_against_its_schema():
    cand, = shadow.prepare(RS, [candidate()])
    state = CustomerState()
    when = at(date(2026, 3, 10))
    buy(state, when, 200_000, RS)
    buy(state, when.replace(hour=13), 200_000, RS)
    sig0 = shadow.signature((cand,), state)
    grade("c1", RS, state, when, Cause("transaction", "e1"), NOW)
    shadow.follow_event((cand,), "c1", state, when, when.timestamp(), Cause("transaction", "e1"), NOW)
    sig1 = shadow.signature((cand,), state)
    assert sig0 == (None,) and sig1 == ((("value", "B", "A"),),) and shadow.differs(sig1)
    doc = shadow.diff_record(RS, (cand,), "c1", state, NOW)
    ShadowDiff.model_validate(doc)
    assert doc["differs"] is True and doc["grades"] == {"value": "B"}
    (mine,) = doc["shadows"]
    assert mine["ruleset"] == {"id": "rfm-5", "version": "2"} and mine["grades"] == {"value": "A"}
    (d,) = mine["differences"]
    assert (d["from"], d["to"], d["direction"], d["alert"]) == ("B", "A", "upgrade", None)
    assert d["values"] == {"frequency": 2, "monetary": "4000.00", "recency_days": 0}
    assert "Net spend 4000.00 CNY in the last 365 days (≥ 3000.00 CNY): M=3." in d["reasons"]


def test_a_key_downgrade_names_the_alert_promotion_would_raise():
    strict, = shadow.prepare(RS, [candidate(recency=False, monetary=False, **{"- {min: 10, grade: A}": "- {min: 11, grade: A}"})])
    state = CustomerState()
    when = at(date(2026, 3, 10))
    buy(state, when, 250_000, RS)
    buy(state, when.replace(hour=13), 250_000, RS)  # R5 F2 M3 = 10: A under rfm-5, B under the candidate
    grade("c1", RS, state, when, Cause("transaction", "e1"), NOW)
    shadow.follow_event((strict,), "c1", state, when, when.timestamp(), Cause("transaction", "e1"), NOW)
    (d,) = shadow.diff_record(RS, (strict,), "c1", state, NOW)["shadows"][0]["differences"]
    assert (d["from"], d["to"], d["direction"], d["alert"]) == ("A", "B", "downgrade", "critical")


def test_shadows_no_longer_configured_are_forgotten():
    cand, = shadow.prepare(RS, [candidate()])
    state = CustomerState(shadow={"rfm-5@0": {"g": {"value": "S"}, "s": {}, "at": 1.0}})
    shadow.forget_others((cand,), state)
    assert state.shadow == {}
    assert parse(RFM5).version == "1"
