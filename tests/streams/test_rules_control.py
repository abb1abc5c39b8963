"""The rules-control record without a broker (streams/rules_control.py): which record is in force,
what a worker starts with, when it switches, the cause of the changes a switch makes, progress."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from rules.engine import compile_ruleset
from rules.ruleset import PRESETS_DIR, parse
from schemas.events import GradeChange, RulesControl, RulesProgress, RulesetRef
from streams.processor import TRANSACTIONS, Record, process_batch
from streams.rules_control import (ACTIVE, PROGRESS, ActiveRules, ControlError, Start, build_record, choose_start,
                                   compile_record, coverage, latest_control, promotion_id)
from streams.rules_start import SweepProgress
from streams.settings import load_settings

V1_TEXT = (PRESETS_DIR / "rfm-5.yaml").read_text(encoding="utf-8")
V2_TEXT = V1_TEXT.replace('version: "1"', 'version: "2"').replace("{min: 10, grade: A}", "{min: 11, grade: A}")
V1, V2 = compile_ruleset(parse(V1_TEXT)), compile_ruleset(parse(V2_TEXT))
SETTINGS = load_settings(app_id="ctl")
NOW = datetime(2026, 7, 1, 12, 0, tzinfo=timezone.utc)


def encoded(record: RulesControl) -> tuple[bytes, bytes]:
    return ACTIVE, record.model_dump_json().encode()


def test_each_promotion_names_the_one_before_and_counts_up() -> None:
    first = build_record(SETTINGS, None, V1, V1_TEXT, V2, V2_TEXT, "promote")
    assert (first.control_version, first.ruleset, first.previous) == (1, RulesetRef(id="rfm-5", version="2"),
                                                                       RulesetRef(id="rfm-5", version="1"))
    assert first.previous_document == V1_TEXT and first.document == V2_TEXT
    back = build_record(SETTINGS, first, V2, V2_TEXT, V1, V1_TEXT, "rollback")
    assert (back.control_version, back.ruleset.version, back.previous.version) == (2, "1", "2")  # type: ignore[union-attr]
    assert back.previous_document == V2_TEXT
    # Deterministic, and another one for each record: the same version promoted twice makes new change ids.
    assert first.promotion_id == promotion_id("ctl", 1, "rfm-5@2") != promotion_id("ctl", 3, "rfm-5@2")
    RulesControl.model_validate(orjson.loads(back.model_dump_json()))


def test_the_record_in_force_is_the_highest_version_in_offset_order() -> None:
    one = build_record(SETTINGS, None, V1, V1_TEXT, V2, V2_TEXT, "promote")
    two = build_record(SETTINGS, one, V2, V2_TEXT, V1, V1_TEXT, "rollback")
    racer = build_record(SETTINGS, one, V2, V2_TEXT, V1, V1_TEXT, "promote")  # a second writer of version 2
    progress = (PROGRESS + b"w1", b"{}")
    assert latest_control([]) is None
    assert latest_control([encoded(one), progress, encoded(two)]) == two
    assert latest_control([encoded(one), encoded(two), encoded(racer)]) == two  # the first of a version wins
    assert latest_control([encoded(two), encoded(one)]) == two  # never back to a lower version
    assert latest_control([encoded(one), (ACTIVE, b"not json"), (ACTIVE, None)]) == one


def test_the_promoted_ruleset_wins_over_the_local_one_and_says_so() -> None:
    assert choose_start(V1, None, 0).ruleset is V1
    record = build_record(SETTINGS, None, V1, V1_TEXT, V2, V2_TEXT, "promote")
    start = choose_start(V1, record, 7)
    assert start.ruleset.key == "rfm-5@2" and start.offset == 7 and start.record == record
    assert start.note is not None and "rfm-5@2 is active by rules-control v1" in start.note
    assert "GRADEFLOW_RULESET names rfm-5@1, which is NOT used" in start.note
    assert choose_start(V2, record, 7).note is None


def test_a_record_whose_document_is_another_ruleset_is_refused() -> None:
    record = build_record(SETTINGS, None, V1, V1_TEXT, V2, V2_TEXT, "promote")
    forged = record.model_copy(update={"document": V1_TEXT})
    with pytest.raises(ControlError, match="the document is ruleset rfm-5@1, the record names rfm-5@2"):
        compile_record(forged)


class Component(SimpleNamespace):
    def switch(self, ruleset: Any, promotion: Any = None) -> None:
        self.rs, self.promotion_id = ruleset, promotion


def test_a_switch_waits_for_the_writer_lock_and_switches_every_component() -> None:
    record = build_record(SETTINGS, None, V1, V1_TEXT, V2, V2_TEXT, "promote")

    async def run() -> None:
        writer = asyncio.Lock()
        rules = ActiveRules(SimpleNamespace(), SETTINGS, Start(V1, None, 0), writer)
        rules.grader, rules.clock = SimpleNamespace(ruleset=V1, promotion_id=None), SimpleNamespace(rs=V1)
        rules.downstream = Component()
        async with writer:  # a batch being graded
            task = asyncio.ensure_future(rules.apply(record))
            for _ in range(5):
                await asyncio.sleep(0)
            assert not task.done() and rules.grader.ruleset is V1 and rules.active is V1
        assert await task is True
        assert rules.grader.ruleset.key == rules.clock.rs.key == rules.downstream.rs.key == "rfm-5@2"
        assert rules.grader.promotion_id == record.promotion_id
        assert (rules.control_version, rules.previous, rules.switches) == (1, "rfm-5@1", 1)
        assert await rules.apply(record) is False  # not above the version in force
        bad = build_record(SETTINGS, record, V2, V2_TEXT, V1, "id: [", "rollback")
        assert await rules.apply(bad) is False
        assert rules.refused == 1 and rules.active.key == "rfm-5@2"
        status = rules.status()
        assert status["active"] == {"id": "rfm-5", "version": "2"} and status["previous"] == "rfm-5@1"
        assert status["regrade_complete"] is True  # this worker has no sweep

    asyncio.run(run())


def purchase(customer: str, n: int, amount: str) -> Record:
    value = orjson.dumps({"event_id": f"{customer}-{n}", "customer_id": customer, "type": "purchase",
                          "occurred_at": f"2026-05-{n + 1:02d}T10:00:00+08:00", "amount": amount, "currency": "CNY"})
    return Record(TRANSACTIONS, "t", 0, n, customer.encode(), value)


def test_an_event_of_a_customer_graded_by_the_old_version_is_preceded_by_the_promotions_change() -> None:
    store: dict[str, bytes] = {}

    class Store:
        def get(self, customer_id: str) -> bytes | None:
            return store.get(customer_id)

    def batch(rs: Any, records: list[Record], promotion: str | None) -> list[dict[str, Any]]:
        result = process_batch(records, rs, Store(), NOW, check_keys=False, promotion_id=promotion)
        store.update({c: raw for c, (raw, _) in result.states.items()})
        return [orjson.loads(v) for _, v in result.grade_changes]

    # Three purchases of 1100: R5 F3 M2 = 10 points, A under v1, B under v2.
    assert [c["grade"] for c in batch(V1, [purchase("ann", n, "1100") for n in range(3)], None)] == ["B", "A"]
    before = dict(store)
    [rules] = batch(V2, [purchase("ann", 3, "100")], "p-1")  # 4th purchase, still 10 points: B under v2
    # A replay of the same records from the same state (a crash before the state was written): the same change.
    after = dict(store)
    store.clear()
    store.update(before)
    assert batch(V2, [purchase("ann", 3, "100")], "p-1") == [rules] and store == after
    assert (rules["cause"], rules["previous_grade"], rules["grade"]) == (
        {"kind": "rules", "event_id": "p-1", "previous_ruleset": {"id": "rfm-5", "version": "1"}}, "A", "B")
    GradeChange.model_validate(rules)
    # Back to v1, then v2 again by another promotion: each switch makes a change of its own id.
    [back] = batch(V1, [purchase("ann", 4, "100")], "p-2")
    # The 6th purchase makes 11 points: v2 first says B (the promotion), then A (the purchase).
    again, bought = batch(V2, [purchase("ann", 5, "100")], "p-3")
    assert (again["cause"]["kind"], again["grade"], bought["cause"]["kind"], bought["grade"]) == (
        "rules", "B", "transaction", "A")
    assert back["cause"]["previous_ruleset"] == {"id": "rfm-5", "version": "2"}
    assert len({rules["event_id"], back["event_id"], again["event_id"]}) == 3


def test_progress_counts_customers_and_gives_an_eta_until_done() -> None:
    p = SweepProgress()
    p.begin("rfm-5@2", {0, 1}, set(), None)
    p.total = 100
    assert p.eta_s() is None and not p.complete
    p.step(25, 10)
    eta = p.eta_s()
    assert eta is not None and eta >= 0
    p.step(75, 30)
    p.finish({0, 1})
    assert p.complete and p.eta_s() is None
    assert p.as_dict() | {"eta_s": None} == {"ruleset": "rfm-5@2", "partitions": [0, 1], "partitions_done": [0, 1],
                                             "customers_total": 100, "customers_done": 100, "regraded": 40,
                                             "eta_s": None, "complete": True}


def test_a_switch_during_a_sweep_leaves_no_partition_done_for_the_new_ruleset() -> None:
    from streams.rules_start import RulesRegrade

    regrade = RulesRegrade(SimpleNamespace(), SETTINGS, V1, None, None)
    regrade.progress.begin("rfm-5@1", {0, 1}, {0, 1}, None)  # a sweep after a rebalance, partitions done by v1
    regrade.swept = {0, 1}
    regrade.switch(V2, "p-1")
    assert regrade.swept == set() and regrade.rs is V2 and regrade.promotion_id == "p-1"
    progress = regrade.progress.as_dict()
    assert (progress["ruleset"], progress["partitions_done"], progress["complete"]) == ("rfm-5@2", [], False)


def test_the_wait_counts_partitions_done_by_any_worker_for_that_record_only() -> None:
    def report(worker: str, version: int, ruleset: str, done: list[int], total: int, examined: int,
               complete: bool) -> tuple[bytes, bytes]:
        rid, _, v = ruleset.partition("@")
        doc = RulesProgress(worker=worker, control_version=version, ruleset=RulesetRef(id=rid, version=v),
                            partitions=done, partitions_done=done if complete else [], customers_total=total,
                            customers_done=examined, regraded=0, eta_s=None, complete=complete,
                            updated_at=NOW)
        return PROGRESS + worker.encode(), doc.model_dump_json().encode()

    records = [report("a", 1, "rfm-5@2", [0, 1], 50, 10, False),
               report("b", 1, "rfm-5@2", [2, 3], 60, 60, True),
               report("c", 0, "rfm-5@1", [0, 1, 2, 3], 10, 10, True),  # another record's: not counted
               report("a", 1, "rfm-5@2", [0, 1], 50, 30, False)]  # a's latest report
    done, examined, total, reports = coverage(records, 1, "rfm-5@2")
    assert (done, examined, total, len(reports)) == ({2, 3}, 90, 110, 2)
    done, *_ = coverage(records + [report("a", 1, "rfm-5@2", [0, 1], 50, 50, True)], 1, "rfm-5@2")
    assert done == {0, 1, 2, 3}


def test_the_regrade_settings_are_bounded_and_named_when_refused() -> None:
    from schemas.errors import ConfigurationError

    settings = load_settings(rules_regrade_chunk=50, rules_regrade_pause_s=0.5, alert_fold_rules_changes=False)
    assert (settings.rules_regrade_chunk, settings.rules_regrade_pause_s, settings.alert_fold_rules_changes) == (
        50, 0.5, False)
    for name, value in (("rules_regrade_chunk", 0), ("rules_regrade_pause_s", 61), ("rules_regrade_pause_s", -1)):
        with pytest.raises(ConfigurationError, match=f"GRADEFLOW_{name.upper()}"):
            load_settings(**{name: value})
