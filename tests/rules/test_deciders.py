"""Every way of deciding, the metric catalogue, hysteresis, re-grading on new rules, and refusals."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from rules.changes import Cause, grade, regrade_for_rules
from rules.engine import compile_ruleset, evaluate
from rules.ruleset import load, parse
from rules.state import CustomerState
from schemas.errors import RulesetError
from schemas.events import GradeChange

from tests.rules.presethelp import contact, fold_one, grade_of, local, state_of, txn

D0 = local("2026-03-10")
NOW = datetime(2026, 3, 11, tzinfo=timezone.utc)


def ruleset(body: str, head: str = ""):
    return compile_ruleset(parse(f'id: t\nversion: "1"\n{head}ladders:\n{body}'))


# ---------------------------------------------------------------- bands on one metric

BANDS = ruleset("""
  spend:
    grades: [gold, silver, bronze]
    decide:
      metric: purchases.sum.30d
      bands:
        - {above: 1000, grade: gold}
        - {min: 500, grade: silver}
      else: bronze
  recency:
    grades: [hot, warm, cold]
    decide:
      metric: recency_days
      bands:
        - {below: 7, grade: hot}
        - {max: 30, grade: warm}
      else: cold
""")


@pytest.mark.parametrize(("amount", "expected"), [("1000.01", "gold"), ("1000", "silver"), ("500", "silver"),
                                                   ("499.99", "bronze")])
def test_bands_min_and_above(amount, expected) -> None:
    assert grade_of(BANDS, [txn(D0, "purchase", amount)], ladder="spend")[0] == expected


@pytest.mark.parametrize(("days", "expected"), [(6, "hot"), (7, "warm"), (30, "warm"), (31, "cold")])
def test_bands_below_and_max(days, expected) -> None:
    assert grade_of(BANDS, [txn(D0, "purchase", "1")], as_of=D0 + timedelta(days=days), ladder="recency")[0] == expected


def test_bands_unknown_value_takes_else_and_says_so() -> None:
    g, ev = grade_of(BANDS, [contact(D0, "call")], ladder="recency")
    assert g == "cold"
    assert ev.reasons["recency"] == ["No purchase yet (value unknown): grade cold."]


def test_gross_sum_ignores_refunds_but_net_does_not() -> None:
    events = [txn(D0, "purchase", "800"), txn(D0, "purchase", "300"), txn(D0, "refund", "300")]
    g, ev = grade_of(BANDS, events, ladder="spend")
    assert g == "gold" and ev.values["purchases.sum.30d"] == 1100_00


# ---------------------------------------------------------------- first-match rules

RULES = ruleset("""
  intent:
    grades: [hot, warm, cold, out]
    decide:
      rules:
        - grade: out
          because: asked us to stop
          when: {not: {any: [{metric: attribute.consent, exists: false}, {metric: attribute.consent, eq: true}]}}
        - grade: hot
          when:
            all:
              - {metric: attribute.stage, in: [negotiating, closing]}
              - any:
                  - {metric: attribute.probability, ge: 0.8}
                  - {metric: interactions.count.meeting.14d, ge: 2}
        - grade: warm
          when: {metric: attribute.stage, exists: true}
      else: cold
""", head="attributes: {stage: text, probability: number, consent: bool}\n")


def test_rules_first_match_with_all_any_not() -> None:
    stage = contact(D0, "stage_update", stage="negotiating")
    assert grade_of(RULES, [stage])[0] == "warm"
    assert grade_of(RULES, [stage, contact(D0, "call", probability=0.8)])[0] == "hot"
    meetings = [contact(D0 - timedelta(days=d), "meeting") for d in (1, 13)]
    g, ev = grade_of(RULES, [stage, *meetings], as_of=D0)
    assert g == "hot"
    assert ev.reasons["intent"] == [
        "Rule 2: Stage = negotiating (one of closing, negotiating) and meeting interactions in the last 14 days: 2 ≥ 2: "
        "grade hot."]
    assert grade_of(RULES, [stage, *meetings], as_of=D0 + timedelta(days=1))[0] == "warm"  # one meeting left the window
    assert grade_of(RULES, [contact(D0, "call")])[0] == "cold"
    assert grade_of(RULES, [stage, contact(D0, "email", consent=False)])[0] == "out"
    assert grade_of(RULES, [stage, contact(D0, "email", consent=True)])[0] == "warm"


def test_latest_attribute_by_event_time_whatever_the_arrival_order() -> None:
    older = contact(D0, "stage_update", stage="closing", probability=0.9)
    newer = contact(D0 + timedelta(days=1), "stage_update", probability=0.1)
    assert grade_of(RULES, [older, newer])[0] == "warm"
    assert grade_of(RULES, [newer, older])[0] == "warm"
    cleared = contact(D0 + timedelta(days=2), "stage_update", stage=None)
    assert grade_of(RULES, [older, cleared])[0] == "cold"


def test_unreadable_attribute_value_is_unknown() -> None:
    assert grade_of(RULES, [contact(D0, "stage_update", stage="closing", probability="high")])[0] == "warm"


# ---------------------------------------------------------------- scorecard

SCORECARD = ruleset("""
  quality:
    grades: [A, B, C]
    decide:
      scorecard:
        spend:
          metric: purchases.net.365d
          weight: 2
          points:
            - {ge: 10000, points: 30}
            - {ge: 1000, points: 10}
        visits:
          metric: interactions.count.visit.90d
          points:
            - {ge: 3, points: 20}
          else: 5
      bands:
        - {min: 70, grade: A}
        - {min: 25, grade: B}
      else: C
""")


def test_scorecard_weights_and_bands() -> None:
    visits = [contact(D0 - timedelta(days=i), "visit") for i in range(3)]
    g, ev = grade_of(SCORECARD, [txn(D0, "purchase", "10000"), *visits])
    assert g == "A"  # 2 × 30 + 20 = 80
    assert ev.reasons["quality"][-1] == "Scorecard total 80 (≥ 70): grade A."
    assert ev.reasons["quality"][0].endswith("→ 30 points × 2 = 60.")
    assert grade_of(SCORECARD, [txn(D0, "purchase", "1000")])[0] == "B"  # 2 × 10 + 5 = 25
    assert grade_of(SCORECARD, [txn(D0, "purchase", "999.99")])[0] == "C"  # 0 + 5


# ---------------------------------------------------------------- relative

RELATIVE = ruleset("""
  value:
    grades: [top, above_median, rest]
    decide:
      rules:
        - {grade: top, when: {metric: monetary, top_percent: 10}}
        - {grade: above_median, when: {metric: frequency, gt: {quantile: 0.5}}}
      else: rest
""")


def test_relative_comparisons_against_population_thresholds() -> None:
    assert RELATIVE.quantiles == (("frequency", 0.5), ("monetary", 0.9))
    pop = {("monetary", 0.9): 5000_00.0, ("frequency", 0.5): 2.0}
    three = [txn(D0 - timedelta(days=i), "purchase", "10") for i in range(3)]
    assert grade_of(RELATIVE, [txn(D0, "purchase", "5000")], population=pop)[0] == "top"
    assert grade_of(RELATIVE, three, population=pop)[0] == "above_median"
    assert grade_of(RELATIVE, three[:2], population=pop)[0] == "rest"
    assert grade_of(RELATIVE, three)[0] == "rest"  # no population known


# ---------------------------------------------------------------- metric catalogue

def test_calendar_windows() -> None:
    rs = ruleset("""
  v:
    grades: [a, b]
    decide:
      rules:
        - {grade: a, when: {metric: purchases.count.month, ge: 1}}
      else: b
""", head="")
    rs2 = compile_ruleset(parse("""id: t
version: "1"
ladders:
  v:
    grades: [a, b]
    decide:
      scorecard:
        m: {metric: purchases.count.month, points: [{ge: 0, points: 0}]}
        y: {metric: purchases.count.year, points: [{ge: 0, points: 0}]}
        lm: {metric: purchases.count.last_month, points: [{ge: 0, points: 0}]}
        ly: {metric: purchases.count.last_year, points: [{ge: 0, points: 0}]}
        d: {metric: purchases.days.365d, points: [{ge: 0, points: 0}]}
        mx: {metric: purchases.max.365d, points: [{ge: 0, points: 0}]}
        avg: {metric: purchases.avg.365d, points: [{ge: 0, points: 0}]}
        rf: {metric: purchases.refunds.365d, points: [{ge: 0, points: 0}]}
        t: {metric: tenure_days, points: [{ge: 0, points: 0}]}
      bands: [{min: 0, grade: a}]
      else: b
"""))
    assert rs2.retention_days == 731
    events = [txn(local("2025-12-31", 23), "purchase", "10"), txn(local("2026-02-28"), "purchase", "30"),
              txn(local("2026-02-28"), "purchase", "5"), txn(local("2026-03-01", 0), "purchase", "1"),
              txn(local("2026-03-02"), "refund", "6")]
    v = evaluate(rs2, state_of(rs2, events), local("2026-03-02")).values
    assert (v["purchases.count.month"], v["purchases.count.year"], v["purchases.count.last_month"],
            v["purchases.count.last_year"]) == (1, 3, 2, 1)
    assert (v["purchases.days.365d"], v["purchases.max.365d"], v["purchases.avg.365d"], v["purchases.refunds.365d"]) == (
        3, 30_00, 11_50, 6_00)
    assert v["tenure_days"] == 61
    assert grade_of(rs, [txn(local("2026-02-28"), "purchase", "1")], as_of=local("2026-03-01"))[0] == "b"


def test_average_daily_balance_and_current_balance() -> None:
    rs = ruleset("""
  v:
    grades: [a, b]
    decide:
      rules:
        - {grade: a, when: {all: [{metric: balance.adb.month, ge: 0}, {metric: balance.current, ge: 0}]}}
      else: b
""")
    events = [txn(local("2026-03-01"), "deposit", "3000"), txn(local("2026-03-03"), "withdrawal", "1000")]
    v = evaluate(rs, state_of(rs, events), local("2026-03-04")).values
    # End-of-day balances 3000, 3000, 2000, 2000 over March 1-4.
    assert v["balance.adb.month"] == 2500_00 and v["balance.current"] == 2000_00


def test_balance_survives_pruning_of_old_flows() -> None:
    rs = ruleset("""
  v:
    grades: [a, b]
    decide:
      metric: balance.adb.last_month
      bands: [{min: 1000, grade: a}]
      else: b
""")
    events = [txn(local("2025-01-01"), "deposit", "1000"), txn(local("2026-03-05"), "deposit", "1")]
    state = state_of(rs, events)
    assert list(state.flows) == [local("2026-03-05").toordinal()] and state.balance_base == 1000_00
    assert grade_of(rs, events)[0] == "a"


def test_interaction_recency_and_totals() -> None:
    rs = ruleset("""
  v:
    grades: [a, b]
    decide:
      rules:
        - {grade: a, when: {all: [{metric: interactions.recency_days.visit, le: 3},
                                  {metric: interactions.total.any, ge: 2}, {metric: interactions.recency_days, le: 0}]}}
      else: b
""")
    assert grade_of(rs, [contact(D0, "visit"), contact(D0 + timedelta(days=3), "call")])[0] == "a"
    assert grade_of(rs, [contact(D0, "visit"), contact(D0 + timedelta(days=4), "call")])[0] == "b"


# ---------------------------------------------------------------- hysteresis

DWELL = ruleset("""
  value:
    grades: [A, B]
    key: [A]
    hysteresis: {min_dwell_days: 7}
    decide:
      metric: purchases.net.30d
      bands: [{min: 1000, grade: A}]
      else: B
""")
MARGIN = ruleset("""
  value:
    grades: [A, B, C]
    hysteresis: {margin: 100}
    decide:
      metric: purchases.net.365d
      bands: [{min: 2000, grade: A}, {min: 1000, grade: B}]
      else: C
""")


def _walk(rs, events):
    """Grades emitted as each event is folded in (as the processor does)."""
    state = CustomerState()
    out = []
    for e in events:
        fold_one(rs, state, e)
        changes, _ = grade("c1", rs, state, datetime.fromisoformat(e["occurred_at"]), Cause("transaction", e["event_id"]), NOW)
        out += [c["grade"] for c in changes]
    return out, state


def test_min_dwell_holds_a_grade() -> None:
    buy = txn(D0, "purchase", "1000")
    refund = txn(D0 + timedelta(days=3), "refund", "1")
    later = txn(D0 + timedelta(days=7), "purchase", "1")
    grades, state = _walk(DWELL, [buy, refund])
    assert grades == ["A"]  # B held back: A only 3 days ago
    ev = evaluate(DWELL, state, D0 + timedelta(days=3))
    assert ev.grades["value"] == "A" and "Held at A (hysteresis)" in ev.reasons["value"][-1]
    grades, _ = _walk(DWELL, [buy, refund, txn(D0 + timedelta(days=7), "refund", "1")])
    assert grades == ["A", "B"]  # 7 days on: the dwell is over
    assert _walk(DWELL, [buy, refund, later])[0] == ["A"]  # back to 1000.00: A still


def test_margin_needs_the_value_beyond_the_bound() -> None:
    seq = [txn(D0, "purchase", "1500"),  # B
           txn(D0, "purchase", "550"),  # 2050: within 100 of 2000 → stays B
           txn(D0, "purchase", "50"),  # 2100 → A
           txn(D0, "refund", "60"),  # 2040: within the margin, stays A
           txn(D0, "refund", "50")]  # 1990 → but 1990 + 100 ≥ 2000: still A
    grades, _ = _walk(MARGIN, seq)
    assert grades == ["B", "A"]
    grades, _ = _walk(MARGIN, seq + [txn(D0, "refund", "91")])  # 1899 + 100 < 2000 → B
    assert grades == ["B", "A", "B"]


def test_margin_is_refused_for_rules() -> None:
    with pytest.raises(RulesetError, match="a margin needs a decider with bands"):
        parse('id: t\nversion: "1"\nladders:\n  v:\n    grades: [a, b]\n    hysteresis: {margin: 1}\n'
              '    decide:\n      rules: [{grade: a}]\n      else: b\n')


# ---------------------------------------------------------------- new rules, changes, state

def test_regrade_for_rules_emits_only_differences_with_cause_rules() -> None:
    old = compile_ruleset(load("rfm-5"))
    events = [txn(D0 - timedelta(days=i), "purchase", "2000") for i in range(2)]  # R5 F2 M2 = 9: B
    state = state_of(old, events)
    changes, _ = grade("c1", old, state, D0, Cause("transaction", "x"), NOW)
    assert [c["grade"] for c in changes] == ["B"] and state.ruleset == "rfm-5@1"
    # Same ruleset: nothing.
    assert regrade_for_rules("c1", old, state, NOW) == ([], [])
    # A new version that still says B: nothing, but the state now knows the version.
    same = compile_ruleset(parse(Path(load.__globals__["PRESETS_DIR"] / "rfm-5.yaml").read_text(encoding="utf-8")
                                 .replace('version: "1"', 'version: "2"')))
    assert regrade_for_rules("c1", same, state, NOW) == ([], []) and state.ruleset == "rfm-5@2"
    # A new version where 9 points make A, plus a new ladder.
    text = Path(load.__globals__["PRESETS_DIR"] / "rfm-5.yaml").read_text(encoding="utf-8")
    text = text.replace('version: "1"', 'version: "3"').replace("{min: 10, grade: A}", "{min: 9, grade: A}")
    text += """  lifecycle:
    grades: [active, lapsed]
    decide:
      metric: recency_days
      bands: [{max: 90, grade: active}]
      else: lapsed
"""
    new = compile_ruleset(parse(text))
    changes, alerts = regrade_for_rules("c1", new, state, NOW)
    assert [(c["ladder"], c["previous_grade"], c["grade"], c["cause"]) for c in changes] == [
        ("value", "B", "A", {"kind": "rules", "event_id": None, "previous_ruleset": {"id": "rfm-5", "version": "2"}}),
        ("lifecycle", None, "active", {"kind": "rules", "event_id": None,
                                       "previous_ruleset": {"id": "rfm-5", "version": "2"}})]
    for c in changes:
        GradeChange.model_validate(c)
        assert c["as_of"] == D0.isoformat() and c["ruleset"] == {"id": "rfm-5", "version": "3"}
    again = CustomerState.from_bytes(state.to_bytes())
    assert regrade_for_rules("c1", new, again, NOW) == ([], [])
    # Back to version 1: a downgrade from the key grade A, with its alert; the lifecycle ladder is forgotten.
    changes, alerts = regrade_for_rules("c1", old, state, NOW)
    assert [(c["previous_grade"], c["grade"]) for c in changes] == [("A", "B")] and len(alerts) == 1
    assert state.grades == {"value": "B"}


def test_change_values_hold_the_ladders_metrics() -> None:
    rs = RULES
    state = state_of(rs, [contact(D0, "stage_update", stage="closing", probability=0.9)])
    changes, _ = grade("c1", rs, state, D0, Cause("interaction", "i"), NOW)
    [change] = changes
    GradeChange.model_validate(change)
    assert change["metrics"]["values"] == {"attribute.consent": None, "attribute.probability": 0.9,
                                           "attribute.stage": "closing", "interactions.count.meeting.14d": 0}
    money = compile_ruleset(load("annual-sales-vip"))
    state = state_of(money, [txn(D0, "purchase", "10000000.5")])
    [change], _ = grade("c1", money, state, D0, Cause("transaction", "t"), NOW)
    assert change["metrics"]["values"] == {"purchases.net.365d": "10000000.50"}


def test_state_round_trip_and_format_1() -> None:
    rs = compile_ruleset(load("scorecard-abc"))
    events = [txn(D0, "purchase", "10"), txn(D0, "invoice", "5", invoice_id="a"), txn(D0, "invoice", "5", invoice_id="b"),
              txn(D0 + timedelta(days=3), "payment", "5", invoice_id="a"), txn(D0, "deposit", "7"),
              contact(D0, "assessment", sales_rating="good")]
    state = state_of(rs, events)
    state.grades, state.grade_since, state.ruleset = {"quality": "C"}, {"quality": 1.5}, "scorecard-abc@1"
    again = CustomerState.from_bytes(state.to_bytes())
    assert again == state
    old = b'[1,10.0,10.0,10.0,[[739000,2,500]],null,{"visit":1},{"value":"A"},{"t":4}]'
    s1 = CustomerState.from_bytes(old)
    assert s1.buckets == {739000: [2, 500]} and s1.grades == {"value": "A"} and s1.ruleset is None


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize(("decide", "where", "words"), [
    ("metric: purchases.net.fortnight\n      bands: [{min: 1, grade: a}]\n      else: b",
     "ladders.v.decide.metric", "unknown window 'fortnight'"),
    ("metric: interactions.count.telegram.30d\n      bands: [{min: 1, grade: a}]\n      else: b",
     "ladders.v.decide.metric", "unknown interaction type 'telegram'"),
    ("metric: purchases.net.30d\n      bands: [{min: 1.001, grade: a}]\n      else: b",
     "ladders.v.decide.bands.0.min", "more decimals than CNY allows"),
    ("metric: frequency\n      bands: [{min: 1.5, grade: a}]\n      else: b",
     "ladders.v.decide.bands.0.min", "whole number"),
    ("metric: frequency\n      bands: [{min: 1, grade: a}, {min: 2, grade: b}]\n      else: b",
     "ladders.v.decide.bands.1", "highest bound down"),
    ("metric: frequency\n      bands: [{min: 1, grade: a}, {max: 0, grade: b}]\n      else: b",
     "ladders.v.decide.bands", "all use min/above"),
    ("rules: [{grade: a, when: {metric: frequency, ge: {quantile: 1.5}}}]\n      else: b",
     "ladders.v.decide.rules.0.when.ge", "strictly between 0 and 1"),
    ("rules: [{grade: a, when: {metric: frequency}}]\n      else: b",
     "ladders.v.decide.rules.0.when", "compares nothing"),
    ("rules: [{grade: a, when: {metric: frequency, ge: 1}, then: {metric: frequency, bands: [{min: 1, grade: a}], else: b}}]\n      else: b",
     "ladders.v.decide.rules.0", "exactly one of 'grade' or 'then'"),
    ("sum: [r]\n      metric: frequency\n      bands: [{min: 1, grade: a}]\n      else: b",
     "ladders.v.decide", "exactly one of 'sum'"),
    ("rules: [{grade: a, when: {metric: frequency, ge: 1}}]\n      bands: [{min: 1, grade: a}]\n      else: b",
     "ladders.v.decide.bands", "remove 'bands'"),
    ("rules: [{grade: a, when: {metric: frequency, gt: abc}}]\n      else: b",
     "ladders.v.decide.rules.0.when.gt", "'abc' is not a number"),
    ("rules: [{grade: a, when: {metric: recency_days, in: [1, x]}}]\n      else: b",
     "ladders.v.decide.rules.0.when.in.1", "'x' is not a number"),
])
def test_refusals_name_the_path_and_what_is_wrong(decide, where, words) -> None:
    text = f'id: t\nversion: "1"\nladders:\n  v:\n    grades: [a, b]\n    decide:\n      {decide}\n'
    with pytest.raises(RulesetError) as caught:
        parse(text, "f.yaml")
    problems = caught.value.problems
    assert any(p.startswith(where + " (line") and words in p for p in problems), problems
