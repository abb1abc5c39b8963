"""Merging two customer states (rules/merge.py) equals folding both customers' events into one."""

from __future__ import annotations

from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from rules import windows
from rules.merge import merge_facts
from rules.state import (CustomerState, Tracking, apply_balance, apply_interaction, apply_invoice, apply_transaction,
                         prune, remember)

TZ = ZoneInfo("Asia/Shanghai")
START = 1_767_225_600  # 2026-01-01T00:00:00Z
TRACK = Tracking(detail=False, interaction_days=True, attributes=(("stage", "text"), ("score", "number")))

KINDS = ("purchase", "refund", "deposit", "withdrawal", "invoice", "payment", "call", "visit")
_event = st.tuples(
    st.sampled_from(("a", "b")),                      # whose event
    st.sampled_from(KINDS),
    st.integers(0, 400 * 86400),                      # seconds after START (made unique below)
    st.integers(1, 10**7),                            # amount, minor units
    st.sampled_from(("inv-1", "inv-2", "inv-3")),
    st.sampled_from((None, {"stage": "won"}, {"stage": "lost", "score": "7"}, {"score": 3})),
)


def fold_all(state: CustomerState, events: list[tuple], detail: bool, own_invoices: bool = False) -> None:
    for n, (who, kind, offset, amount, invoice, attrs) in events:
        if own_invoices:
            invoice = f"{who}-{invoice}"
        ts = float(START + offset) + n / 1000.0  # distinct instants: "latest wins" has no ties
        day = windows.day_of_ts(ts, TZ)
        if kind in ("purchase", "refund"):
            apply_transaction(state, ts, day, kind == "refund", amount, detail)
        elif kind in ("deposit", "withdrawal"):
            apply_balance(state, ts, day, kind == "withdrawal", amount)
        elif kind in ("invoice", "payment"):
            apply_invoice(state, ts, day, invoice, kind == "payment")
        else:
            apply_interaction(state, ts, kind, day, attrs, TRACK, TZ)
        remember(state, int(ts // 86400), f"e{n}")


FACTS = ("last_event_ts", "last_purchase_ts", "first_purchase_ts", "buckets", "last_interaction_ts",
         "interaction_counts", "last_by_type", "ibuckets", "attrs", "flows", "balance_base", "invoices", "seen")


def facts(state: CustomerState) -> dict:
    return {name: getattr(state, name) for name in FACTS}


@settings(max_examples=300, deadline=None)
@given(events=st.lists(_event, max_size=60), detail=st.booleans(), prune_at=st.none() | st.integers(0, 500))
def test_merging_two_states_equals_folding_the_union_of_their_events(events, detail, prune_at) -> None:
    numbered = list(enumerate(events))
    a, b, union = CustomerState(), CustomerState(), CustomerState()
    # Pruning forgets paid invoices past the retention: an invoice one id received and the other
    # paid that long ago cannot be matched any more (rules/merge.py says so); within the
    # retention both ids may hold parts of the same invoice.
    own = prune_at is not None
    fold_all(a, [e for e in numbered if e[1][0] == "a"], detail, own)
    fold_all(b, [e for e in numbered if e[1][0] == "b"], detail, own)
    fold_all(union, numbered, detail, own)
    if prune_at is not None:  # each side pruned on its own, before the merge, as a worker would have
        as_of = windows.day_of_ts(float(START + prune_at * 86400), TZ)
        for s in (a, b, union):
            prune(s, as_of, 90)
    merge_facts(a, b)
    assert facts(a) == facts(union)
    assert CustomerState.from_bytes(a.to_bytes()) == a


def test_what_is_not_a_fact_of_the_events_stays_the_surviving_customers() -> None:
    into = CustomerState(grades={"value": "A"}, offsets={"t": 41}, grade_since={"value": 1.0}, ruleset="rfm-5@1",
                         warned={"value": 2.0})
    other = CustomerState(grades={"value": "S"}, offsets={"t": 900, "i": 3}, grade_since={"value": 5.0},
                          ruleset="rfm-5@2", warned={"value": 9.0})
    merge_facts(into, other)
    assert (into.grades, into.offsets, into.grade_since, into.ruleset, into.warned) == (
        {"value": "A"}, {"t": 41}, {"value": 1.0}, "rfm-5@1", {"value": 2.0})


def test_a_detailed_day_and_a_plain_day_combine_into_a_detailed_one() -> None:
    into = CustomerState(buckets={739655: [2, 30000]})
    other = CustomerState(buckets={739655: [1, 50000, 50000, 50000]})
    merge_facts(into, other)
    assert into.buckets == {739655: [3, 80000, 80000, 50000]}
