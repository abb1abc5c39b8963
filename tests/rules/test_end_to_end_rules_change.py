"""End to end on the broker: a new ruleset version re-grades every customer at start, cause `rules`, no more.

``plan`` (the pure step of streams/rules_start.py) is tested here too.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import orjson
import pytest

from rules.changes import Cause, grade
from rules.engine import compile_ruleset
from rules.ruleset import PRESETS_DIR, parse
from streams.tools.local import consume
from tests.streams.producerhelp import produce_librdkafka as produce
from streams.rules_start import plan

from tests.rules.presethelp import local, state_of, txn

RFM5 = (PRESETS_DIR / "rfm-5.yaml").read_text(encoding="utf-8")
# Version 2: A needs 11 points instead of 10.
V2 = RFM5.replace('version: "1"', 'version: "2"').replace("{min: 10, grade: A}", "{min: 11, grade: A}")


def test_plan_regrades_only_customers_of_another_version() -> None:
    v1, v2 = compile_ruleset(parse(RFM5)), compile_ruleset(parse(V2))
    d0 = local("2026-03-10")
    items = []
    for name, n in (("ten", 2), ("seven", 1)):
        events = [txn(d0 - timedelta(days=i), "purchase", "2500" if n == 2 else "100", customer=name)
                  for i in range(n)]
        state = state_of(v1, events)
        grade(name, v1, state, d0, Cause("transaction", "x"), d0)
        items.append((name.encode(), state.to_bytes()))
    # "ten": R5 F2 M3 = 10 → A under v1, B under v2; "seven": R5 F1 M1 = 7 → B under both.
    changes, alerts, states = plan(v2, items)
    assert [(k, orjson.loads(v)["grade"], orjson.loads(v)["cause"]["kind"]) for k, v in changes] == [(b"ten", "B", "rules")]
    assert [orjson.loads(v)["severity"] for _, v in alerts] == ["critical"]
    assert set(states) == {b"ten", b"seven"}  # both now marked as graded by v2
    assert plan(v2, [(k, new) for k, (_, new) in states.items()]) == ([], [], {})


def _id(doc: dict) -> str:
    return doc.get("alert_id") or doc["event_id"]


def purchase(event_id: str, customer: str, day: int, amount: str) -> tuple[bytes, bytes]:
    return customer.encode(), orjson.dumps({"event_id": event_id, "customer_id": customer, "type": "purchase",
                                            "occurred_at": f"2026-05-{day:02d}T10:00:00+08:00", "amount": amount,
                                            "currency": "CNY"})


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_new_version_regrades_on_start_with_cause_rules(worker_factory, bootstrap, tmp_path: Path,
                                                        guarantee: str) -> None:
    # With exactly_once the sweep writes each chunk's changes, alerts and states in one transaction
    # per input partition (streams/rules_start.py).
    rules = tmp_path / "rules.yaml"
    rules.write_text(RFM5, encoding="utf-8")
    first = worker_factory(GRADEFLOW_RULESET=str(rules), GRADEFLOW_PROCESSING_GUARANTEE=guarantee)
    env = first.env
    topics = [env["GRADEFLOW_TOPIC_GRADE_CHANGES"], env["GRADEFLOW_TOPIC_ALERTS"]]
    # amy: 6 purchases of 4000 → R5 F4 M4 = 13 → S (S under v2 too). bo: 2 × 5000 → R5 F2 M3 = 10 → A (B under v2).
    # cy: 1 × 100 → R5 F1 M1 = 7 → B (B under v2).
    history = [purchase(f"amy{i}", "amy", i + 1, "4000") for i in range(6)]
    history += [purchase("bo1", "bo", 1, "5000"), purchase("bo2", "bo", 2, "5000"), purchase("cy1", "cy", 3, "100")]
    produce(bootstrap, env["GRADEFLOW_TOPIC_TRANSACTIONS"], history)
    before = list(consume(bootstrap, topics, idle_s=8, timeout_s=90))
    last = {}
    for _, _, value in before:
        doc = orjson.loads(value)
        if "ladder" in doc and "grade_change_event_id" not in doc:
            last[doc["customer_id"]] = doc["grade"]
    assert last == {"amy": "S", "bo": "A", "cy": "B"}, first.tail()
    first.stop()

    rules.write_text(V2, encoding="utf-8")
    second = worker_factory(env=env, name="v2")
    seen = {_id(orjson.loads(v)) for _, _, v in before}
    docs = [d for _, _, v in consume(bootstrap, topics, idle_s=10, timeout_s=90) if _id(d := orjson.loads(v)) not in seen]
    changes = [d for d in docs if "direction" in d]
    alerts = [d for d in docs if "alert_id" in d]
    assert [(c["customer_id"], c["previous_grade"], c["grade"], c["cause"], c["ruleset"]) for c in changes] == [
        ("bo", "A", "B", {"kind": "rules", "event_id": None, "previous_ruleset": {"id": "rfm-5", "version": "1"}},
         {"id": "rfm-5", "version": "2"})], second.tail()
    assert changes[0]["as_of"] == "2026-05-02T10:00:00+08:00"
    assert [(a["customer_id"], a["previous_grade"], a["grade"]) for a in alerts] == [("bo", "A", "B")]
    second.stop()

    # A second start with the same version finds every customer graded: nothing more.
    third = worker_factory(env=env, name="v2-again")
    assert len(list(consume(bootstrap, topics, idle_s=8, timeout_s=60))) == len(before) + len(docs), third.tail()
