"""Property tests: grading is deterministic and independent of the order of events inside the window."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rules.engine import evaluate
from rules.state import CustomerState
from tests.rules.presethelp import contact, local, preset, state_of, txn

END = local("2026-06-30", 20)
PRESETS = ["rfm-5", "rfm-8", "education-sadc", "sales-cycle-abcde", "b2b-pipeline-abcd", "real-estate-abcd",
           "annual-sales-vip", "scorecard-abc", "bank-tiers", "pharma-abc", "risk-3", "credit-days", "lifecycle",
           "loyalty", "key-account-abc"]
POPULATION = {("purchases.net.365d", 0.95): 30_000_00.0, ("purchases.net.365d", 0.8): 5_000_00.0}

ATTRIBUTES: dict[str, st.SearchStrategy[Any]] = {
    "stage": st.sampled_from(["negotiating", "comparing", "trial", "consulting", "no_need"]),
    "budget_confirmed": st.booleans(),
    "probability": st.sampled_from([0.2, 0.5, 0.7, "70%", None]),
    "expected_close_at": st.dates(min_value=END.date() - timedelta(days=30),
                                  max_value=END.date() + timedelta(days=400)).map(lambda d: d.isoformat()),
    "expected_monthly_amount": st.integers(0, 200_000),
    "need": st.sampled_from(["clear", "potential", "none"]),
    "sales_rating": st.sampled_from(["good", "较好", "average", "poor"]),
    "hospital_level": st.sampled_from(["1", "2", "三级"]),
    "prescribing": st.sampled_from(["first_choice", "次选", "other"]),
    "identity_verified": st.booleans(),
    "household_income": st.integers(0, 4_000_000),
    "queue_number": st.just("Q-1"),
}


@st.composite
def histories(draw: st.DrawFn) -> list[dict]:
    n = draw(st.integers(1, 25))
    # Distinct minutes inside the last 360 days: the window of every preset, no ties between events.
    minutes = draw(st.lists(st.integers(0, 360 * 24 * 60), min_size=n, max_size=n, unique=True))
    events = []
    for m in minutes:
        when = END - timedelta(minutes=m)
        kind = draw(st.sampled_from(["purchase", "purchase", "refund", "deposit", "withdrawal", "invoice", "payment",
                                     "visit", "call", "meeting", "trial_class", "stage_update", "assessment",
                                     "queue_number", "deposit_paid", "overdue", "complaint", "referral"]))
        if kind in ("purchase", "refund", "deposit", "withdrawal", "invoice", "payment"):
            amount = draw(st.integers(1, 5_000_000))
            extra = {"invoice_id": f"inv{draw(st.integers(0, 3))}"} if kind in ("invoice", "payment") else {}
            events.append(txn(when, kind, f"{amount / 100:.2f}", **extra))
        else:
            names = draw(st.lists(st.sampled_from(sorted(ATTRIBUTES)), max_size=3, unique=True))
            events.append(contact(when, kind, **{k: draw(ATTRIBUTES[k]) for k in names}))
    return events


def _grades(name: str, events: list[dict]) -> tuple[dict, dict]:
    rs = preset(name)
    ev = evaluate(rs, state_of(rs, events), END, POPULATION)
    return ev.grades, ev.values


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=histories(), order=st.randoms(use_true_random=False))
def test_grades_do_not_depend_on_the_order_of_events_inside_the_window(events, order) -> None:
    shuffled = events[:]
    order.shuffle(shuffled)
    for name in PRESETS:
        assert _grades(name, events) == _grades(name, shuffled), name


@settings(max_examples=60, deadline=None)
@given(events=histories())
def test_grading_is_deterministic_and_survives_the_changelog(events) -> None:
    for name in PRESETS:
        rs = preset(name)
        state = state_of(rs, events)
        first = evaluate(rs, state, END, POPULATION)
        again = evaluate(rs, CustomerState.from_bytes(state.to_bytes()), END, POPULATION)
        assert (first.grades, first.values, first.reasons) == (again.grades, again.values, again.reasons), name
        assert first.reasons == evaluate(rs, state_of(rs, events), END, POPULATION).reasons
