"""rfm-5 scores at every band boundary and the value-grade ladder (rules/engine.py).

Expected values are read from rules/presets/rfm-5.yaml: R by days since the
last purchase (≤7 → 5, ≤30 → 4, ≤60 → 3, ≤120 → 2, else 1), F by purchases
in 365 days (≥12 → 5, ≥6 → 4, ≥3 → 3, ≥2 → 2, else 1), M by net CNY in 365
days (≥50000 → 5, ≥20000 → 4, ≥5000 → 3, ≥1000 → 2, else 1), grade by R+F+M
(≥13 S, ≥10 A, ≥7 B, ≥5 C, else D).
"""

from __future__ import annotations

from datetime import datetime

import pytest

from rules.engine import evaluate
from rules.state import CustomerState

from tests.rules.rulehelp import buy, customer

AS_OF = datetime.fromisoformat("2025-06-30T20:00:00+08:00")


@pytest.mark.parametrize(("days", "r"), [(0, 5), (7, 5), (8, 4), (30, 4), (31, 3), (60, 3), (61, 2), (120, 2), (121, 1), (364, 1)])
def test_recency_score_boundaries(rfm5, days, r) -> None:
    ev = evaluate(rfm5, customer(rfm5, AS_OF, days, 1, 1_00), AS_OF)
    assert ev.recency_days == days
    assert ev.scores["r"] == r


def test_no_purchase_scores_r1_and_says_so(rfm5) -> None:
    ev = evaluate(rfm5, CustomerState(), AS_OF)
    assert ev.recency_days is None
    assert ev.scores == {"r": 1, "f": 1, "m": 1}
    assert ev.grades == {"value": "D"}
    assert ev.reasons["value"][0] == "No purchase yet (below every band): R=1."


def test_recency_counts_local_calendar_days_not_24_hour_periods(rfm5) -> None:
    state = CustomerState()
    buy(state, datetime.fromisoformat("2025-06-22T23:59:00+08:00"), 1_00, rfm5)
    # 8 calendar days later in Shanghai, though only 7 days and 1 minute have passed.
    assert evaluate(rfm5, state, datetime.fromisoformat("2025-06-30T00:00:00+08:00")).scores["r"] == 4
    assert evaluate(rfm5, state, datetime.fromisoformat("2025-06-29T23:59:59+08:00")).scores["r"] == 5


@pytest.mark.parametrize(("count", "f"), [(12, 5), (11, 4), (6, 4), (5, 3), (3, 3), (2, 2), (1, 1), (0, 1)])
def test_frequency_score_boundaries(rfm5, count, f) -> None:
    state = customer(rfm5, AS_OF, 3 if count else None, count, count * 1_00)
    ev = evaluate(rfm5, state, AS_OF)
    assert ev.frequency == count
    assert ev.scores["f"] == f


@pytest.mark.parametrize(("net_minor", "m"), [
    (50_000_00, 5), (49_999_99, 4), (20_000_00, 4), (19_999_99, 3), (5_000_00, 3), (4_999_99, 2),
    (1_000_00, 2), (999_99, 1), (1, 1),
])
def test_monetary_score_boundaries(rfm5, net_minor, m) -> None:
    ev = evaluate(rfm5, customer(rfm5, AS_OF, 1, 1, net_minor), AS_OF)
    assert ev.monetary_minor == net_minor
    assert ev.scores["m"] == m


def test_negative_net_scores_m1_and_shows_the_negative_amount(rfm5) -> None:
    state = customer(rfm5, AS_OF, 10, 1, 100_00)
    buy(state, datetime.fromisoformat("2025-06-25T10:00:00+08:00"), 250_50, rfm5, refund=True)
    ev = evaluate(rfm5, state, AS_OF)
    assert ev.monetary_minor == -150_50
    assert ev.scores["m"] == 1
    assert "-150.50 CNY" in ev.reasons["value"][2]


def test_monetary_sums_several_purchases_exactly(rfm5) -> None:
    # 3 × 16666.67 = 50000.01: at M=5 only if no cent is lost on the way.
    state = CustomerState()
    for day in ("2025-06-01", "2025-06-02", "2025-06-03"):
        buy(state, datetime.fromisoformat(f"{day}T10:00:00+08:00"), 16_666_67, rfm5)
    ev = evaluate(rfm5, state, AS_OF)
    assert ev.monetary_minor == 50_000_01
    assert ev.scores["m"] == 5


# (recency days, purchases, net minor) → (R, F, M), their sum, the grade.
LADDER = [
    ((0, 12, 5_000_00), (5, 5, 3), 13, "S"),
    ((0, 12, 1_000_00), (5, 5, 2), 12, "A"),
    ((30, 3, 5_000_00), (4, 3, 3), 10, "A"),
    ((31, 3, 5_000_00), (3, 3, 3), 9, "B"),
    ((61, 3, 1_000_00), (2, 3, 2), 7, "B"),
    ((120, 2, 1_000_00), (2, 2, 2), 6, "C"),
    ((121, 2, 1_000_00), (1, 2, 2), 5, "C"),
    ((200, 2, 999_99), (1, 2, 1), 4, "D"),
]


@pytest.mark.parametrize(("shape", "rfm", "total", "grade"), LADDER, ids=[f"{t}-{g}" for _, _, t, g in LADDER])
def test_grade_ladder_by_sum(rfm5, shape, rfm, total, grade) -> None:
    days, count, net = shape
    ev = evaluate(rfm5, customer(rfm5, AS_OF, days, count, net), AS_OF)
    assert (ev.scores["r"], ev.scores["f"], ev.scores["m"]) == rfm
    assert sum(rfm) == total
    assert ev.grades == {"value": grade}
    assert ev.code == "".join(map(str, rfm))
    reasons = ev.reasons["value"]
    assert len(reasons) == 4
    assert f"{days} days ago" in reasons[0] and f"R={rfm[0]}" in reasons[0]
    assert f"{count} purchases" in reasons[1] and f"F={rfm[1]}" in reasons[1]
    assert f"{net // 100}.{net % 100:02d} CNY" in reasons[2] and f"M={rfm[2]}" in reasons[2]
    assert reasons[3].startswith(f"R+F+M = {total} ")
    assert reasons[3].endswith(f"grade {grade}.")


def test_reasons_name_the_band_that_applied(rfm5) -> None:
    ev = evaluate(rfm5, customer(rfm5, AS_OF, 31, 3, 5_000_00), AS_OF)
    assert ev.reasons["value"] == [
        "Last purchase 31 days ago (≤ 60 days): R=3.",
        "3 purchases in the last 365 days (≥ 3): F=3.",
        "Net spend 5000.00 CNY in the last 365 days (≥ 5000.00 CNY): M=3.",
        "R+F+M = 9 (≥ 7): grade B.",
    ]


def test_kept_sentences_read_as_freshly_built_ones_and_stay_bounded() -> None:
    # A ruleset of its own: the cache lives on the compiled ruleset.
    from rules.deciders import _score
    from rules.engine import compile_ruleset
    from rules.explain import _KEPT, _metric_sentence
    from rules.ruleset import load

    rs = compile_ruleset(load("rfm-5"))
    states = [customer(rs, AS_OF, days, count, net) for days, count, net in
              [(0, 1, 1_00), (31, 3, 5_000_00), (31, 3, 7_00), (400, 1, 9_00), (7, 12, 50_000_00), (None, 0, 0)]]
    for _ in range(2):  # the second pass reads kept sentences
        for state in states:
            ev = evaluate(rs, state, AS_OF)
            fresh = []
            for score in rs.scores:
                value = ev.values[score.metric]
                points, bound = _score(score, value)
                fresh.append(_metric_sentence(rs, score, value, points, bound))
            assert ev.reasons["value"][:3] == fresh
    assert rs.sentences  # kept: recency, frequency, small amounts
    assert all(value is None or (type(value) is int and abs(value) <= _KEPT) for _, value in rs.sentences)
    assert not any(name == "m" and value == 50_000_00 for name, value in rs.sentences)  # large money: never kept


def test_the_sum_sentence_names_the_decided_grade_each_time(rfm5) -> None:
    # The decider keeps one template per (total, floor); the grade is filled in per evaluation.
    first = evaluate(rfm5, customer(rfm5, AS_OF, 31, 3, 5_000_00), AS_OF).reasons["value"][3]
    again = evaluate(rfm5, customer(rfm5, AS_OF, 31, 3, 5_000_00), AS_OF).reasons["value"][3]
    other = evaluate(rfm5, customer(rfm5, AS_OF, 0, 12, 50_000_00), AS_OF).reasons["value"][3]
    assert first == again == "R+F+M = 9 (≥ 7): grade B."
    assert other == "R+F+M = 15 (≥ 13): grade S."
