"""End to end on the real broker: one worker, one ruleset, two ladders side by side.

Interactions grade intent and transactions grade value for the same customers;
every change names its ladder, alerts fire per ladder for its key grades.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson

from streams.tools.local import consume, produce
from tests.rules.rulehelp import two_ladder_ruleset

RULESET = two_ladder_ruleset("e2e-multi", [
    "{grade: D, because: no need, when: {metric: attribute.stage, eq: no_need}}",
    "{grade: S, because: negotiating, when: {metric: attribute.stage, eq: negotiating}}",
    "{grade: A, because: met, when: {metric: interactions.count.meeting.30d, ge: 1}}",
    "{grade: B, because: trying, when: {metric: interactions.count.trial_class.60d, ge: 1}}",
    "{grade: C, because: visited, when: {metric: interactions.count.visit.180d, ge: 1}}",
])


def interaction(event_id: str, customer: str, day: int, kind: str, **attributes) -> tuple[bytes, bytes]:
    doc: dict[str, Any] = {"event_id": event_id, "customer_id": customer,
                           "occurred_at": f"2026-04-{day:02d}T10:00:00+08:00",
           "type": kind}
    if attributes:
        doc["attributes"] = attributes
    return customer.encode(), orjson.dumps(doc)


def txn(event_id: str, customer: str, day: int, amount: str, kind: str = "purchase") -> tuple[bytes, bytes]:
    doc = {"event_id": event_id, "customer_id": customer, "occurred_at": f"2026-04-{day:02d}T15:00:00+08:00",
           "type": kind, "amount": amount, "currency": "CNY"}
    return customer.encode(), orjson.dumps(doc)


INTERACTIONS = [
    interaction("i1", "ann", 1, "visit"),
    interaction("i2", "ben", 1, "visit"),
    interaction("i3", "ann", 2, "trial_class"),
    interaction("i4", "ann", 3, "meeting"),
    interaction("i5", "ann", 4, "stage_update", stage="negotiating"),
    interaction("i6", "ann", 5, "stage_update", stage="no_need"),
]
TRANSACTIONS = [
    txn("t1", "ann", 6, "6000"),
    txn("t2", "ben", 6, "1000.00"),
    txn("t3", "ann", 7, "5000"),
    txn("t4", "ann", 8, "2000", kind="refund"),
]
# (customer, ladder) → [(previous, grade, cause kind, cause event)]
# (customer, ladder) -> its changes: (previous grade, grade, cause kind, cause event id).
Changes = dict[tuple[str, str], list[tuple[str | None, str, str, str]]]

PHASE1: Changes = {
    ("ann", "intent"): [(None, "C", "interaction", "i1"), ("C", "B", "interaction", "i3"),
                        ("B", "A", "interaction", "i4"), ("A", "S", "interaction", "i5"),
                        ("S", "D", "interaction", "i6")],
    ("ann", "value"): [(None, "C", "interaction", "i1")],
    ("ben", "intent"): [(None, "C", "interaction", "i2")],
    ("ben", "value"): [(None, "C", "interaction", "i2")],
}
PHASE2: Changes = {
    ("ann", "value"): [("C", "A", "transaction", "t1"), ("A", "VIP", "transaction", "t3"),
                       ("VIP", "A", "transaction", "t4")],
    ("ben", "value"): [("C", "B", "transaction", "t2")],
}


def _read(bootstrap: str, env: dict, until: int):
    topics = [env["GRADEFLOW_TOPIC_GRADE_CHANGES"], env["GRADEFLOW_TOPIC_ALERTS"]]
    got = list(consume(bootstrap, topics, until=until, idle_s=30, timeout_s=90))
    changes: dict[tuple[str, str], list] = defaultdict(list)
    alerts = []
    docs = []
    for topic, key, value in got:
        doc = orjson.loads(value)
        assert key == doc["customer_id"].encode()
        if topic == topics[0]:
            docs.append(doc)
            changes[(doc["customer_id"], doc["ladder"])].append(
                (doc["previous_grade"], doc["grade"], doc["cause"]["kind"], doc["cause"]["event_id"]))
        else:
            alerts.append((doc["customer_id"], doc["ladder"], doc["previous_grade"], doc["grade"], doc["severity"],
                           doc["dedup_key"]))
    return dict(changes), sorted(alerts), docs


def test_one_worker_grades_intent_from_interactions_and_value_from_transactions(worker_factory, bootstrap,
                                                                                 tmp_path: Path) -> None:
    rules = tmp_path / "multi.yaml"
    rules.write_text(RULESET, encoding="utf-8")
    worker = worker_factory(GRADEFLOW_RULESET=str(rules))
    env = worker.env

    # Phase 1: interactions only; every customer's first event grades both ladders.
    produce(bootstrap, env["GRADEFLOW_TOPIC_INTERACTIONS"], INTERACTIONS)
    n1 = sum(map(len, PHASE1.values())) + 1
    changes, alerts, docs = _read(bootstrap, env, n1)
    assert changes == PHASE1, worker.tail()
    assert alerts == [("ann", "intent", "S", "D", "critical", "gradeflow/intent/ann/key-downgrade")]
    s_to_d = next(d for d in docs if d["cause"]["event_id"] == "i6")
    assert s_to_d["reasons"] == ["Rule 1 (no need): Stage = no_need: grade D."]
    assert s_to_d["metrics"]["values"]["attribute.stage"] == "no_need"
    assert s_to_d["ruleset"] == {"id": "e2e-multi", "version": "1"}

    # Phase 2: transactions for the same customers move only the value ladder.
    produce(bootstrap, env["GRADEFLOW_TOPIC_TRANSACTIONS"], TRANSACTIONS)
    n2 = n1 + sum(map(len, PHASE2.values())) + 1
    changes, alerts, docs = _read(bootstrap, env, n2)
    expected = {k: v + PHASE2.get(k, []) for k, v in PHASE1.items()}
    assert changes == expected, worker.tail()
    assert alerts == [("ann", "intent", "S", "D", "critical", "gradeflow/intent/ann/key-downgrade"),
                      ("ann", "value", "VIP", "A", "warning", "gradeflow/value/ann/key-downgrade")]
    vip = next(d for d in docs if d["cause"]["event_id"] == "t3")
    assert vip["metrics"]["values"] == {"purchases.net.365d": "11000.00"}
    assert vip["reasons"] == ["Net spend (purchases minus refunds) in the last 365 days: 11000.00 CNY (> 10000.00 CNY): "
                              "grade VIP."]
    # Nothing more arrives.
    topics = [env["GRADEFLOW_TOPIC_GRADE_CHANGES"], env["GRADEFLOW_TOPIC_ALERTS"]]
    assert len(list(consume(bootstrap, topics, idle_s=3, timeout_s=15))) == n2
