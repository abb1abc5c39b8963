"""Through process_batch (the worker's code): a multi-ladder ruleset gives the same outputs however records are batched."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from rules.engine import compile_ruleset
from rules.ruleset import parse
from streams.processor import INTERACTIONS, TRANSACTIONS, Record, process_batch

from tests.rules.presethelp import contact, local, txn
from tests.rules.rulehelp import two_ladder_ruleset

RS = compile_ruleset(parse(two_ladder_ruleset(
    "multi",
    ["{grade: S, when: {all: [{metric: attribute.stage, eq: negotiating}, {metric: attribute.probability, ge: 0.5}]}}",
     "{grade: A, when: {metric: interactions.count.meeting.30d, ge: 1}}",
     "{grade: B, when: {metric: interactions.count.trial_class.60d, ge: 1}}",
     "{grade: C, when: {metric: interactions.count.visit.180d, ge: 1}}"],
    attributes="{stage: text, probability: number}",
    # Hysteresis makes a grade depend on earlier ones: batching must not change that either.
    intent_hysteresis="{min_dwell_days: 2}")))
NOW = datetime(2026, 7, 1, tzinfo=timezone.utc)
START = local("2026-01-01")


class Store(dict):
    def get(self, customer_id: str) -> bytes | None:  # type: ignore[override]
        return dict.get(self, customer_id)


@st.composite
def feeds(draw: st.DrawFn) -> list[Record]:
    records = []
    for offset in range(draw(st.integers(1, 40))):
        customer = draw(st.sampled_from(["ann", "ben", "cy"]))
        when = START + timedelta(hours=draw(st.integers(0, 24 * 120)))
        if draw(st.booleans()):
            kind = draw(st.sampled_from(["purchase", "purchase", "refund"]))
            doc = txn(when, kind, str(draw(st.integers(1, 6000))), customer=customer)
            role = TRANSACTIONS
        else:
            kind = draw(st.sampled_from(["visit", "meeting", "trial_class", "stage_update"]))
            attrs = {"stage": "negotiating", "probability": draw(st.sampled_from([0.3, 0.6]))} if kind == "stage_update" else {}
            doc = contact(when, kind, customer=customer, **attrs)
            role = INTERACTIONS
        records.append(Record(role, role, 0, offset, customer.encode(), orjson.dumps(doc)))
    return records


def _run(records: list[Record], cuts: list[int]) -> tuple[list, list, dict]:
    store = Store()
    changes, alerts = [], []
    bounds = sorted({0, len(records), *[c % (len(records) + 1) for c in cuts]})
    for lo, hi in zip(bounds, bounds[1:]):
        result = process_batch(records[lo:hi], RS, store, NOW)
        changes += [orjson.loads(v) for _, v in result.grade_changes]
        alerts += [orjson.loads(v) for _, v in result.alerts]
        for customer, (raw, _) in result.states.items():
            store[customer] = raw
    return sorted(changes, key=lambda c: c["event_id"]), sorted(alerts, key=lambda a: a["alert_id"]), dict(store)


@settings(max_examples=80, deadline=None)
@given(records=feeds(), cuts=st.lists(st.integers(0, 60), max_size=6))
def test_outputs_and_states_do_not_depend_on_batching(records, cuts) -> None:
    one = _run(records, [])
    assert _run(records, cuts) == one
    # Every change names its ladder; a replay of everything changes nothing.
    assert all(c["ladder"] in ("value", "intent") for c in one[0])
    store = Store(one[2])
    again = process_batch(records, RS, store, NOW)
    assert again.grade_changes == [] and again.replayed == len(records)
