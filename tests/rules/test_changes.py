"""Grade changes and key-customer alerts (rules/changes.py), checked against the output contracts."""

from __future__ import annotations

from datetime import datetime, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from rules.changes import Cause, decide_changes
from rules.engine import evaluate
from schemas.events import Alert, GradeChange

from tests.rules.rulehelp import customer

AS_OF = datetime.fromisoformat("2025-06-30T20:00:00+08:00")
NOW = datetime(2025, 7, 1, 0, 0, tzinfo=timezone.utc)

# States that grade S, A, B, C, D (sums 13, 12, 9, 6, 4; see test_engine.py).
SHAPES = {
    "S": (0, 12, 5_000_00),
    "A": (0, 12, 1_000_00),
    "B": (31, 3, 5_000_00),
    "C": (120, 2, 1_000_00),
    "D": (200, 2, 999_99),
}


def _ev(rs, grade: str):
    ev = evaluate(rs, customer(rs, AS_OF, *SHAPES[grade]), AS_OF)
    assert ev.grades["value"] == grade
    return ev


FIRST_CAUSE = Cause("transaction", "e-1")


def _decide(rs, grades, grade, cause=FIRST_CAUSE, customer_id="c-1"):
    changes, alerts = decide_changes(customer_id, rs, grades, _ev(rs, grade), AS_OF, cause, NOW)
    for change in changes:
        GradeChange.model_validate(change)
    for alert in alerts:
        Alert.model_validate(alert)
    return changes, alerts


def test_first_grade_is_initial_and_validates(rfm5) -> None:
    grades: dict[str, str] = {}
    changes, alerts = _decide(rfm5, grades, "B")
    assert alerts == []
    [change] = changes
    assert change["previous_grade"] is None and change["grade"] == "B" and change["direction"] == "initial"
    assert change["customer_id"] == "c-1" and change["ladder"] == "value"
    assert change["ruleset"] == {"id": "rfm-5", "version": "1"}
    assert change["cause"] == {"kind": "transaction", "event_id": "e-1"}
    assert change["metrics"] == {"recency_days": 31, "frequency": 3, "monetary": "5000.00", "r": 3, "f": 3, "m": 3,
                                 "code": "333", "values": {"frequency": 3, "monetary": "5000.00", "recency_days": 31}}
    assert change["as_of"] == "2025-06-30T20:00:00+08:00"
    assert datetime.fromisoformat(change["as_of"]).utcoffset() is not None
    assert "R+F+M = 9 (≥ 7): grade B." in change["reasons"]
    assert grades == {"value": "B"}


def test_no_event_when_grade_is_unchanged(rfm5) -> None:
    grades: dict[str, str] = {}
    assert len(_decide(rfm5, grades, "A")[0]) == 1
    assert _decide(rfm5, grades, "A", Cause("transaction", "e-2")) == ([], [])
    assert grades == {"value": "A"}


def test_direction_upgrade_and_downgrade(rfm5) -> None:
    grades = {"value": "C"}
    [up], _ = _decide(rfm5, grades, "A")
    assert (up["previous_grade"], up["grade"], up["direction"]) == ("C", "A", "upgrade")
    [down], _ = _decide(rfm5, grades, "D")
    assert (down["previous_grade"], down["grade"], down["direction"]) == ("A", "D", "downgrade")


def test_event_id_is_deterministic(rfm5) -> None:
    first, _ = _decide(rfm5, {"value": "C"}, "A")
    again, _ = _decide(rfm5, {"value": "C"}, "A")
    assert first[0]["event_id"] == again[0]["event_id"]
    other_cause, _ = _decide(rfm5, {"value": "C"}, "A", Cause("transaction", "e-2"))
    other_kind, _ = _decide(rfm5, {"value": "C"}, "A", Cause("interaction", "e-1"))
    other_previous, _ = _decide(rfm5, {"value": "D"}, "A")
    other_customer, _ = _decide(rfm5, {"value": "C"}, "A", customer_id="c-2")
    ids = {first[0]["event_id"], other_cause[0]["event_id"], other_kind[0]["event_id"],
           other_previous[0]["event_id"], other_customer[0]["event_id"]}
    assert len(ids) == 5


def test_clock_cause_id_depends_on_the_evaluation_time(rfm5) -> None:
    ev = _ev(rfm5, "B")
    a, _ = decide_changes("c-1", rfm5, {}, ev, AS_OF, Cause("clock", None), NOW)
    b, _ = decide_changes("c-1", rfm5, {}, ev, AS_OF, Cause("clock", None), NOW.replace(hour=5))
    c, _ = decide_changes("c-1", rfm5, {}, ev, AS_OF.replace(minute=1), Cause("clock", None), NOW)
    assert a[0]["event_id"] == b[0]["event_id"]  # emitted_at is not part of the identity
    assert a[0]["event_id"] != c[0]["event_id"]


def test_alerts_only_on_downgrade_from_a_key_grade(rfm5) -> None:
    # rfm-5 key grades are S and A.
    cases = [("S", "A", "warning"), ("S", "B", "critical"), ("A", "B", "critical"), ("A", "D", "critical"),
             ("B", "C", None), ("C", "D", None), ("B", "A", None), ("A", "S", None), ("D", "S", None)]
    for previous, grade, severity in cases:
        changes, alerts = _decide(rfm5, {"value": previous}, grade)
        assert len(changes) == 1
        if severity is None:
            assert alerts == [], (previous, grade)
        else:
            [alert] = alerts
            assert alert["severity"] == severity, (previous, grade)
            assert (alert["previous_grade"], alert["grade"]) == (previous, grade)


def test_no_alert_for_an_initial_grade(rfm5) -> None:
    assert _decide(rfm5, {}, "D")[1] == []


def test_alert_fields_link_to_the_change(rfm5) -> None:
    [change], [alert] = _decide(rfm5, {"value": "A"}, "B", customer_id="客户-7")
    assert alert["grade_change_event_id"] == change["event_id"]
    assert alert["customer_id"] == "客户-7" and alert["ladder"] == "value"
    assert alert["as_of"] == change["as_of"]
    assert alert["dedup_key"] == "gradeflow/value/客户-7/key-downgrade"
    assert alert["cause"] == change["cause"] == {"kind": "transaction", "event_id": "e-1"}
    assert "A → B" in alert["summary"] and "no longer a key customer" in alert["summary"]
    assert "R+F+M = 9" in alert["summary"]
    # The dedup key is the same for any later downgrade of that customer on that ladder;
    # the alert id follows the change.
    [later_change], [later] = _decide(rfm5, {"value": "S"}, "A", Cause("transaction", "e-9"), customer_id="客户-7")
    assert later["dedup_key"] == alert["dedup_key"]
    assert later["alert_id"] != alert["alert_id"]
    assert later["grade_change_event_id"] == later_change["event_id"]
    [_], [again] = _decide(rfm5, {"value": "A"}, "B", customer_id="客户-7")
    assert again["alert_id"] == alert["alert_id"]
    [_], [someone_else] = _decide(rfm5, {"value": "A"}, "B", customer_id="客户-8")
    assert someone_else["dedup_key"] != alert["dedup_key"]


@settings(max_examples=300, deadline=None)
@given(name=st.text(max_size=200))
def test_change_ids_are_the_standard_uuid5_of_their_name(name: str) -> None:
    import uuid

    from rules.changes import _NAMESPACE, uuid5

    assert uuid5(name) == str(uuid.uuid5(_NAMESPACE, name))


def test_each_change_carries_the_emitted_at_it_was_given(rfm5) -> None:
    # The last emitted_at's text is kept between calls (a batch passes one); a new one is formatted anew.
    later = datetime(2025, 7, 2, 3, 4, 5, 678901, tzinfo=timezone.utc)
    for now, grade in [(NOW, "B"), (NOW, "A"), (later, "S"), (NOW, "D")]:
        [change], _ = decide_changes("c-1", rfm5, {}, _ev(rfm5, grade), AS_OF, Cause("transaction", "e-1"), now)
        assert change["emitted_at"] == now.isoformat()
    assert later.isoformat() == "2025-07-02T03:04:05.678901+00:00"
